"""Writing small VNN-LIB 1.0 properties for tests."""


def robustness_vnnlib(path, n_in: int, n_out: int, label: int, radius: float, centre=None) -> str:
    """'some output beats `label`' on the box centre +- radius (centre 0 by default): the
    property holds when the network is robust there."""
    centre = [0.0] * n_in if centre is None else [float(c) for c in centre]
    lines = [f"(declare-const X_{i} Real)" for i in range(n_in)] + [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    lines += [f"(assert (>= X_{i} {c - radius!r}))" for i, c in enumerate(centre)]
    lines += [f"(assert (<= X_{i} {c + radius!r}))" for i, c in enumerate(centre)]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_out) if j != label) + "))")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)
