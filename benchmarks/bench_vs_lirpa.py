"""verikit and auto_LiRPA side by side: time, peak memory and tightness of IBP, CROWN and
alpha-CROWN on the same networks, inputs, eps and batch sizes, in one process.

Installs nothing. When `auto_LiRPA` is importable (see the README, "Benchmark against
auto_LiRPA", for the separate venv), both libraries run in this process, taking turns call by
call; otherwise verikit's figures are printed alone. Every figure is a median over repeated
calls after a warm-up call; ratios are auto_LiRPA / verikit (> 1: verikit is faster / leaner).

Networks (torch nn.Sequential, given to both libraries): the VNN-COMP 2021 MNIST 256x2 MLP
(weights read from its ONNX file), a 4x256 and a 9x200 MNIST MLP, a small MNIST CNN with
average pooling, an oval21-style CIFAR CNN (conv 8 4x4/2, conv 16 4x4/2, linear 100, 10) and
CNN7 (SABR's, with BatchNorm). The MNIST nets are trained here for a few hundred steps (cached
under --cache); the CIFAR CNN keeps its seeded initialisation and sees seeded uniform images
(no CIFAR-10 download). The spec is the robustness margins y_label - y_j, folded into the last
layer by both libraries (auto_LiRPA: its C argument).

Tightness: per (net, batch, method) the mean worst margin (min over j of the lower bound of
y_label - y_j) of each library, the largest difference |v - a| / (1 + |a|) over all rows, and a
verdict: `equal` (<= 1e-4: the same relaxation computed the same way), `verikit tighter` or
`LOOSER` (verikit below auto_LiRPA by more than 1e-4 somewhere). At batch > 1 the script also
bounds every sample on its own (batch 1) with both libraries and prints how far each
library's batched bounds are from its own per-sample bounds (the batch-size evidence).

Arithmetic: one more call of each library under a counting dispatch mode (flops.py, torch's
FlopCounterMode formulas) gives the floating point operations of its matrix products and
convolutions (GFLOP per call, and the ratio
auto_LiRPA / verikit). Where that ratio is below the speed-up a target asks for, the target
needs auto_LiRPA to run its products less efficiently than verikit, whatever verikit does
around them (--no-flops skips the count).

    python benchmarks/bench_vs_lirpa.py                            # everything except the CNN7 extras
    python benchmarks/bench_vs_lirpa.py --nets mlp256x2,mlp9x200 --batches 1,32 --repeats 15
    python benchmarks/bench_vs_lirpa.py --nets cnn7 --methods crown  # ~2 minutes, ~8 GB for auto_LiRPA
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from flops import gflop  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402
MLP_ONNX = os.path.join(HERE, "..", "..", "shared", "vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")
SHIM_DIR = os.path.join(HERE, "..", "..", "shared", "tools")
NETS = ("mlp256x2", "mlp256x4", "mlp9x200", "cnn-avgpool", "oval21-cifar", "cnn7")
METHODS = ("ibp", "crown", "alpha-crown")
EQUAL_TOL = 1e-4


# ------------------------------------------------------------------------------------ networks
def _mlp(widths, n_in=784, n_out=10):
    layers, n = [nn.Flatten()], n_in
    for w in widths:
        layers += [nn.Linear(n, w), nn.ReLU()]
        n = w
    return nn.Sequential(*layers, nn.Linear(n, n_out))


def _cnn_avgpool():
    return nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def _oval21_cifar():
    return nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 100), nn.ReLU(), nn.Linear(100, 10))


def _mlp_256x2_from_onnx():
    import onnx
    from onnx import numpy_helper

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(MLP_ONNX).graph.initializer}
    net = _mlp([256, 256])
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for k, lin in zip((0, 2, 4), linears):
            lin.weight.copy_(weights[f"layers.{k}.weight"])
            lin.bias.copy_(weights[f"layers.{k}.bias"])
    return net


def _train_mnist(net, steps, cache, name):
    """A few hundred Adam steps on MNIST (cached), so that bounds are those of a real classifier."""
    import torch.nn.functional as F

    from verikit.datasets import load_mnist

    path = os.path.join(cache, f"{name}_{steps}.pt")
    if os.path.exists(path):
        net.load_state_dict(torch.load(path))
        return net
    torch.manual_seed(0)
    x, y = load_mnist("train")
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(net(x[idx].reshape(-1, 1, 28, 28)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(cache, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


def build_net(name: str, cache: str):
    """(model in eval mode, per-sample input shape, eps, inputs (n, *shape) in [0, 1], labels)."""
    from verikit.datasets import load_mnist

    torch.manual_seed(0)
    if name == "oval21-cifar":
        net, shape, eps = _oval21_cifar(), (3, 32, 32), 1 / 255
        g = torch.Generator().manual_seed(1)
        x = torch.rand((64,) + shape, generator=g)
        with torch.no_grad():
            y = net(x).argmax(1)
    else:
        shape = (1, 28, 28)
        if name == "mlp256x2":
            net, eps = _mlp_256x2_from_onnx(), 0.02
        elif name == "mlp256x4":
            net, eps = _train_mnist(_mlp([256] * 4), 400, cache, name), 0.02
        elif name == "mlp9x200":
            net, eps = _train_mnist(_mlp([200] * 9), 400, cache, name), 0.01
        elif name == "cnn-avgpool":
            net, eps = _train_mnist(_cnn_avgpool(), 300, cache, name), 0.02
        elif name == "cnn7":
            from bench_domains import trained_cnn7

            net, eps = trained_cnn7(cache, 60), 0.002
        else:
            raise SystemExit(f"error: unknown net {name!r}; available: {', '.join(NETS)}")
        x, y = load_mnist("test")
        x, y = x[:64].reshape((64,) + shape), y[:64]
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, shape, eps, x, y


# ------------------------------------------------------------------------------------ measuring
class VerikitRunner:
    name = "verikit"

    def __init__(self, net, shape, args):
        import verikit
        from verikit.domains import get_domain

        self.verikit = verikit
        self.graph = verikit.from_torch(net, shape)
        self.domains = {"ibp": get_domain("box"), "crown": get_domain("crown"),
                        "alpha-crown": get_domain("crown", alpha_steps=args.alpha_steps, alpha_lr=args.alpha_lr)}

    def prepare(self, x, y, eps, method, variant=None):
        box = self.verikit.Box.linf_ball(x, eps)
        spec = self.verikit.Spec.robustness(y, 10)
        domain = self.domains[method]

        def run():
            with torch.no_grad() if method == "ibp" else _null():
                return domain.bound(self.graph, box, spec).lower.detach()

        return run


class LirpaRunner:
    """auto_LiRPA on the same torch module. Variants (all with the spec as its C argument):
    - "default": compute_bounds(method) with auto_LiRPA's default options;
    - "ibp-ref" (crown): its IBP bounds passed as reference_bounds, so that every intermediate
      CROWN bound is intersected with IBP, as verikit does;
    - "fixed" (alpha-crown): intermediate bounds fixed to those of "ibp-ref" CROWN, alphas of the
      last back-substitution only, lower bounds only: the relaxation verikit optimises;
    - "full" (alpha-crown): its default CROWN-Optimized, which re-computes the intermediate
      bounds with their own alphas at every step (a different, larger optimisation problem).
    Everything a variant needs (the IBP and CROWN passes included) runs inside the timed call."""

    name = "auto_LiRPA"

    def __init__(self, net, shape, args):
        import numpy as np
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
        from auto_LiRPA.bound_ops import BoundRelu

        self.np, self.BoundedTensor, self.Ptb, self.BoundRelu = np, BoundedTensor, PerturbationLpNorm, BoundRelu
        self.net, self.shape, self.args = net, shape, args
        self.BoundedModule = BoundedModule
        self.modules = {}

    def module(self, batch, **bound_opts):
        key = (batch, tuple(sorted(bound_opts.items())))
        if key not in self.modules:
            opts = {"optimize_bound_args": {"iteration": self.args.alpha_steps, "lr_alpha": self.args.alpha_lr}}
            opts.update(bound_opts)
            self.modules[key] = self.BoundedModule(self.net, torch.zeros((batch,) + tuple(self.shape)), bound_opts=opts,
                                                   device="cpu", verbose=False)
        return self.modules[key]

    def relu_inputs(self, lm) -> dict:
        """{node name: (lower, upper)} of every ReLU input, as left by the last compute_bounds."""
        out = {}
        for node in lm._modules.values():
            if isinstance(node, self.BoundRelu):
                pre = node.inputs[0]
                out[pre.name] = (pre.lower.detach(), pre.upper.detach())
        return out

    def prepare(self, x, y, eps, method, variant="default", **bound_opts):
        if method == "alpha-crown":  # 0.3's sparse alphas crash on some nets (a shape mismatch in
            # reconstruct_full_alpha); dense alphas are the same optimisation problem
            bound_opts.setdefault("sparse_features_alpha", False)
        lm = self.module(x.shape[0], **bound_opts)
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        bx = self.BoundedTensor(x, self.Ptb(norm=self.np.inf, eps=eps, x_L=lo, x_U=hi))
        C = robustness_C(y)

        def run():
            if method == "ibp":
                with torch.no_grad():
                    return lm.compute_bounds(x=(bx,), C=C, method="IBP")[0].detach()
            if method == "crown" and variant == "default":
                with torch.no_grad():
                    return lm.compute_bounds(x=(bx,), C=C, method="CROWN")[0].detach()
            if method == "alpha-crown" and variant == "full":
                return lm.compute_bounds(x=(bx,), C=C, method="CROWN-Optimized", bound_upper=False)[0].detach()
            with torch.no_grad():
                lm.compute_bounds(x=(bx,), C=C, method="IBP")
                ref = self.relu_inputs(lm)
                lb = lm.compute_bounds(x=(bx,), C=C, method="CROWN", reference_bounds=ref)[0].detach()
            if method == "crown":
                return lb
            interm = {k: list(v) for k, v in self.relu_inputs(lm).items()}
            return lm.compute_bounds(x=(bx,), C=C, method="CROWN-Optimized", bound_upper=False,
                                     intermediate_layer_bounds=interm)[0].detach()

        return run


# the auto_LiRPA variants run beside verikit for each method (the first is the like-for-like one)
LIRPA_VARIANTS = {"ibp": {"auto_LiRPA": "default"},
                  "crown": {"auto_LiRPA": "default", "auto_LiRPA+IBP-ref": "ibp-ref"},
                  "alpha-crown": {"auto_LiRPA fixed-interm.": "fixed", "auto_LiRPA full": "full"}}


class _null:
    gb = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def robustness_C(y):
    """(B, 9, 10): row j of sample b is e_label - e_j, in verikit's Spec.robustness order."""
    B = y.shape[0]
    C = torch.zeros(B, 9, 10)
    for b, t in enumerate(y.tolist()):
        others = [j for j in range(10) if j != t]
        C[b, torch.arange(9), others] = -1.0
        C[b, :, t] = 1.0
    return C


def measure(runners: dict, repeats: int, budget: float):
    """Median seconds and peak memory of each runner's call. The libraries take turns call by
    call (load from other processes hits both alike); one warm-up call each is not timed. Fewer
    than `repeats` calls are made when they would take more than `budget` seconds (at least
    one). Memory is taken in one extra call, or around the last timed call of a slow runner."""
    out, errors, warm = {}, {}, {}
    for k, f in list(runners.items()):  # warm-up; a runner that fails is reported and dropped
        t0 = time.perf_counter()
        try:
            out[k] = f()
        except Exception as e:  # noqa: BLE001  (a library's internal error must not end the benchmark)
            errors[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            del runners[k]
        warm[k] = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget / max(sum(warm.values()), 1e-9))))
    times = {k: [] for k in runners}
    mem = {}
    for i in range(n):
        for k, f in runners.items():
            last_slow = i == n - 1 and warm[k] > 1.0
            with PeakRSS() if last_slow else _null() as p:
                t0 = time.perf_counter()
                out[k] = f()
                times[k].append(time.perf_counter() - t0)
            if last_slow:
                mem[k] = p.gb
    for k, f in runners.items():
        if k not in mem:
            with PeakRSS() as p:
                f()
            mem[k] = p.gb
    return {k: statistics.median(v) for k, v in times.items()}, mem, out, errors, n


def count_flops(runners: dict) -> dict:
    """GFLOP of one call of each runner: its matrix products and convolutions (flops.py; None
    where the count fails)."""
    out = {}
    for k, f in runners.items():
        try:
            out[k] = gflop(f)
        except Exception:  # noqa: BLE001  (a library's op the counter cannot follow: no figure)
            out[k] = None
    return out


def compare(v: torch.Tensor, a: torch.Tensor) -> tuple[float, str]:
    """(largest |v - a| / (1 + |a|), verdict) for verikit's lower bounds v and auto_LiRPA's a."""
    rel = (v - a) / (1 + a.abs())
    worst = float(rel.abs().max())
    if worst <= EQUAL_TOL:
        return worst, "equal"
    if float(rel.min()) >= -EQUAL_TOL:
        return worst, "verikit tighter"
    return worst, "LOOSER"


def worst_margin(lower: torch.Tensor) -> float:
    return float(lower.min(dim=1).values.mean())


# ------------------------------------------------------------------------------------ evidence
def batch_evidence(runners: dict, x, y, eps, method: str, batched: dict, lirpa=None) -> list[str]:
    """Each runner's batched bounds against its own per-sample (batch 1) bounds."""
    lines = []
    for name, make in runners.items():
        try:
            single = torch.cat([make(x[i:i + 1], y[i:i + 1])() for i in range(x.shape[0])])
        except Exception as e:  # noqa: BLE001  (a library's internal error must not end the benchmark)
            lines.append(f"    {name:20s} one at a time failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        diff = batched[name] - single
        looser = int((diff < -EQUAL_TOL * (1 + single.abs())).sum())
        lines.append(f"    {name:20s} batch {x.shape[0]} vs the same samples one at a time: max |diff| "
                     f"{float(diff.abs().max()):.2e}, rows looser in the batch {looser}/{diff.numel()}, "
                     f"mean worst margin {worst_margin(batched[name]):+.4f} (batched) vs {worst_margin(single):+.4f} (one at a time)")
    if lirpa is not None and "auto_LiRPA" in batched:
        # auto_LiRPA 0.3 (sparse intermediate bounds, its default) re-computes with CROWN every
        # neuron that is IBP-unstable in ANY sample of the batch and keeps that CROWN bound
        # without intersecting it with IBP; with the option off, it does so for every neuron
        try:
            dense = lirpa.prepare(x, y, eps, method, sparse_intermediate_bounds=False)()
            single = torch.cat([lirpa.prepare(x[i:i + 1], y[i:i + 1], eps, method, sparse_intermediate_bounds=False)()
                                for i in range(x.shape[0])])
        except Exception as e:  # noqa: BLE001
            lines.append(f"    auto_LiRPA, sparse_intermediate_bounds=False failed: {type(e).__name__}")
            return lines
        lines.append(f"    auto_LiRPA, sparse_intermediate_bounds=False: batch {x.shape[0]} vs one at a time max |diff| "
                     f"{float((dense - single).abs().max()):.2e}; mean worst margin {worst_margin(dense):+.4f}")
    return lines


# ------------------------------------------------------------------------------------ main
def ab_arguments(p, nets: str, reps: int) -> None:
    """The options of the A/B scripts built on these nets (bench_engine_ab.py, bench_allocator.py)."""
    p.add_argument("--nets", default=nets)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "verikit-bench"))


def chosen_nets(p, text: str) -> list:
    """The comma list of --nets, every name one of NETS (else argparse's usage error)."""
    nets = text.split(",")
    unknown = sorted(set(nets) - set(NETS))
    if unknown:
        p.error(f"unknown nets {unknown}; available: {', '.join(NETS)}")
    return nets


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default=",".join(n for n in NETS))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per library (default: 15 on the MLPs, 7 on the small CNNs, 1 on CNN7)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timed calls per (net, batch, method) row; fewer repeats when they would take longer")
    p.add_argument("--alpha-steps", type=int, default=20)
    p.add_argument("--alpha-lr", type=float, default=0.1, help="Adam step of alpha-CROWN, the same for both libraries")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cnn7-batch32", action="store_true", help="also run CNN7 at batch > 1 (auto_LiRPA needs > 16 GB)")
    p.add_argument("--cnn7-alpha", action="store_true", help="also run alpha-CROWN on CNN7 (tens of minutes)")
    p.add_argument("--no-evidence", action="store_true", help="skip the per-sample comparison at batch > 1")
    p.add_argument("--verikit-only", action="store_true", help="do not use auto_LiRPA even if it is importable")
    p.add_argument("--no-flops", action="store_true", help="skip the count of floating point operations")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "verikit-bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    nets = [n for n in args.nets.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    try:
        batches = [int(b) for b in args.batches.split(",")]
        if any(b < 1 for b in batches):
            raise ValueError
    except ValueError:
        _fail(f"--batches must be a comma list of positive integers, got {args.batches!r}")
    for n in nets:
        if n not in NETS:
            _fail(f"unknown net {n!r}; available: {', '.join(NETS)}")
    for m in methods:
        if m not in METHODS:
            _fail(f"unknown method {m!r}; available: {', '.join(METHODS)}")
    if max(batches) > 64:
        _fail("batches above 64 are not supported (64 test inputs per net)")

    have_lirpa = False
    if not args.verikit_only:
        try:
            sys.path.insert(0, SHIM_DIR)
            import lirpa_shim  # noqa: F401  (auto_LiRPA 0.3 on torch 2.x / numpy 2)
            import auto_LiRPA

            have_lirpa = True
            lirpa_version = auto_LiRPA.__version__
        except ImportError as e:
            print(f"auto_LiRPA not importable ({e}): verikit's figures alone")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          + (f"auto_LiRPA {lirpa_version}" if have_lirpa else "no auto_LiRPA")
          + f"; alpha-CROWN: {args.alpha_steps} Adam steps, lr {args.alpha_lr}; "
          "times are medians; speed and memory ratios are auto_LiRPA / verikit")
    rows = []
    for net_name in nets:
        net, shape, eps, x_all, y_all = build_net(net_name, args.cache)
        vk = VerikitRunner(net, shape, args)
        lirpa = LirpaRunner(net, shape, args) if have_lirpa else None
        repeats = args.repeats or (15 if net_name.startswith("mlp") else 1 if net_name == "cnn7" else 7)
        for batch in batches:
            if net_name == "cnn7" and batch > 1 and not args.cnn7_batch32:
                print(f"{net_name} batch {batch}: skipped (--cnn7-batch32)")
                continue
            x, y = x_all[:batch], y_all[:batch]
            for method in methods:
                if net_name == "cnn7" and method == "alpha-crown" and not args.cnn7_alpha:
                    print(f"{net_name} batch {batch} {method}: skipped (--cnn7-alpha)")
                    continue
                makers = {"verikit": lambda xs, ys, m=method: vk.prepare(xs, ys, eps, m)}
                if lirpa is not None:
                    variants = LIRPA_VARIANTS[method] if net_name != "cnn7" else dict(list(LIRPA_VARIANTS[method].items())[:1])
                    for label, variant in variants.items():
                        makers[label] = lambda xs, ys, m=method, v=variant: lirpa.prepare(xs, ys, eps, m, v)
                runners = {k: make(x, y) for k, make in makers.items()}
                t, mem, out, errors, n = measure(runners, repeats, args.budget)
                if "verikit" not in out:
                    print(f"{net_name} batch {batch} {method}: verikit failed: {errors['verikit']}")
                    continue
                for k in errors:
                    makers.pop(k)
                row = {"net": net_name, "batch": batch, "method": method, "eps": eps, "t": t, "mem": mem, "errors": errors,
                       "margin": {k: worst_margin(v) for k, v in out.items()},
                       "cmp": {k: compare(out["verikit"], v) for k, v in out.items() if k != "verikit"},
                       "flops": {} if args.no_flops else count_flops(runners)}
                rows.append(row)
                print_row(row, n)
                if batch > 1 and method == "crown" and not args.no_evidence and net_name != "cnn7":
                    for line in batch_evidence(makers, x, y, eps, method, out, lirpa):
                        print(line, flush=True)
    print_summary(rows)


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def print_row(r, repeats):
    v = r["t"]["verikit"]
    print(f"{r['net']:12s} batch {r['batch']:3d} {r['method']:11s} eps {r['eps']:.4f} (median of {repeats})")
    for k in r["t"]:
        line = (f"    {k:26s} {r['t'][k] * 1e3:10.1f} ms {r['mem'][k]:6.2f} GB  mean worst margin {r['margin'][k]:+9.4f}"
                + _flops(r, k))
        if k != "verikit":
            diff, verdict = r["cmp"][k]
            line += (f"  speed x{r['t'][k] / v:6.2f}  memory x{_ratio(r['mem'][k], r['mem']['verikit'])}"
                     f"  verikit vs this: {verdict} (max rel. diff {diff:.1e})")
        print(line, flush=True)
    for k, e in r["errors"].items():
        print(f"    {k:26s} failed: {e}", flush=True)


def _ratio(a, b):
    return f"{a / b:5.2f}" if b > 1e-3 else "  -  "


def _flop_ratio(r, k):
    """GFLOP of runner k over verikit's in row r (None without both counts)."""
    f, v = r["flops"].get(k), r["flops"].get("verikit")
    return f / v if f is not None and v else None


def _flops(r, k) -> str:
    """'N GFLOP' of runner k, with the ratio to verikit's for auto_LiRPA's ('' without a count)."""
    f, ratio = r["flops"].get(k), _flop_ratio(r, k)
    if f is None:
        return ""
    return f"  {f:8.3f} GFLOP" + (f" (x{ratio:.2f})" if k != "verikit" and ratio is not None else "")


def print_summary(rows):
    if not rows:
        return
    print("\nsummary (median seconds per call; peak memory above the level before the call; x = auto_LiRPA / verikit)")
    print(f"{'net':12s} {'batch':>5s} {'method':11s} {'verikit s':>10s} {'GB':>5s}  auto_LiRPA variants: s, GB, speed-up, memory ratio, tightness, arithmetic ratio")
    for r in rows:
        line = f"{r['net']:12s} {r['batch']:5d} {r['method']:11s} {r['t']['verikit']:10.4f} {r['mem']['verikit']:5.2f}"
        for k in r["t"]:
            if k == "verikit":
                continue
            diff, verdict = r["cmp"][k]
            line += (f"  | {k}: {r['t'][k]:.4f} s {r['mem'][k]:.2f} GB x{r['t'][k] / r['t']['verikit']:.2f} "
                     f"mem x{_ratio(r['mem'][k], r['mem']['verikit']).strip()} {verdict} ({diff:.0e})")
            if _flop_ratio(r, k) is not None:
                line += f" flops x{_flop_ratio(r, k):.2f}"
        for k in r["errors"]:
            line += f"  | {k}: failed"
        print(line)


if __name__ == "__main__":
    main()
