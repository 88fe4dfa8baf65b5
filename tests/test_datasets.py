"""Dataset loading: npz files, reshaping to the model, and the download path (against a
local HTTP server on 127.0.0.1 serving synthetic archives)."""
import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from verikit import data_sources as ds
from verikit.errors import ShapeError, VerikitError


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (random port); yields (base url, www dir, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    log = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *a):
            log.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, log
    httpd.shutdown()
    httpd.server_close()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_fashion_mnist_downloads_verifies_and_caches(server, tmp_path, monkeypatch):
    url, www, log = server
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = rng.integers(0, 10, size=5)
    files = {}
    for kind, arr in (("images", images), ("labels", labels)):
        name = f"t10k-{kind}-synthetic.gz"
        blob = gzip.compress(_idx(arr))
        (www / name).write_bytes(blob)
        files[("test", kind)] = (name, _md5(blob))
    monkeypatch.setattr(ds, "FASHION_MNIST_URL", url)
    monkeypatch.setattr(ds, "FASHION_MNIST_FILES", files)
    monkeypatch.setenv("VERIKIT_DATA", str(tmp_path / "cache"))
    x, y = ds.load_dataset("fashion-mnist", "test")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1))
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert (tmp_path / "cache" / "fashion-mnist" / files[("test", "images")][0]).exists()
    served = len(log)
    x2, _ = ds.load_dataset("fashion-mnist", "test")  # second time: from the cache, no request
    assert len(log) == served and torch.equal(x, x2)


def test_corrupt_download_is_rejected_and_not_kept(server, tmp_path, monkeypatch):
    url, www, _ = server
    (www / "t.gz").write_bytes(b"tampered")
    monkeypatch.setattr(ds, "FASHION_MNIST_URL", url)
    monkeypatch.setattr(ds, "FASHION_MNIST_FILES", {("test", "images"): ("t.gz", _md5(b"original")),
                                                    ("test", "labels"): ("t.gz", _md5(b"original"))})
    monkeypatch.setenv("VERIKIT_DATA", str(tmp_path / "cache"))
    with pytest.raises(VerikitError, match="corrupt"):
        ds.load_fashion_mnist("test")
    assert not list((tmp_path / "cache").rglob("t.gz*"))


def _cifar_archive(batches: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, obj in batches.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def test_cifar10_download_and_decode(server, tmp_path, monkeypatch):
    url, www, _ = server
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(4, 3072)).astype(np.uint8)
    labels = [3, 1, 4, 1]
    blob = _cifar_archive({"test_batch": {b"data": data, b"labels": labels}})
    (www / "c.tar.gz").write_bytes(blob)
    monkeypatch.setattr(ds, "CIFAR10_URL", url + "c.tar.gz")
    monkeypatch.setattr(ds, "CIFAR10_ARCHIVE", ("c.tar.gz", _md5(blob)))
    monkeypatch.setenv("VERIKIT_DATA", str(tmp_path / "cache"))
    x, y = ds.load_dataset("cifar10", "test")
    assert x.shape == (4, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(data.reshape(4, 3, 32, 32).astype(np.float32) / 255))
    assert y.tolist() == labels


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_cifar_pickle_with_code_is_refused_even_when_checksum_matches(server, tmp_path, monkeypatch, capsys):
    url, www, _ = server
    blob = _cifar_archive({"test_batch": {b"data": _Boom(), b"labels": [0]}})
    (www / "c.tar.gz").write_bytes(blob)
    monkeypatch.setattr(ds, "CIFAR10_URL", url + "c.tar.gz")
    monkeypatch.setattr(ds, "CIFAR10_ARCHIVE", ("c.tar.gz", _md5(blob)))
    monkeypatch.setenv("VERIKIT_DATA", str(tmp_path / "cache"))
    with pytest.raises(VerikitError, match="refusing"):
        ds.load_cifar10("test")
    assert "code ran" not in capsys.readouterr().out


def test_cifar_archive_with_wrong_checksum_is_never_opened(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "cifar10"
    cache.mkdir(parents=True)
    (cache / ds.CIFAR10_ARCHIVE[0]).write_bytes(_cifar_archive({"test_batch": {b"data": _Boom(), b"labels": []}}))
    monkeypatch.setenv("VERIKIT_DATA", str(tmp_path / "cache"))
    with pytest.raises(VerikitError, match="checksum mismatch"):
        ds.load_cifar10("test")


def test_offline_without_cache_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "FASHION_MNIST_URL", "http://127.0.0.1:9/")  # discard port: connection refused
    monkeypatch.setenv("VERIKIT_DATA", str(tmp_path / "cache"))
    with pytest.raises(VerikitError) as err:
        ds.load_fashion_mnist("test")
    msg = str(err.value)
    assert "offline" in msg and str(tmp_path / "cache" / "fashion-mnist") in msg and "\n" not in msg


def test_npz_uint8_and_float(tmp_path):
    p = tmp_path / "d.npz"
    x = np.arange(2 * 4, dtype=np.uint8).reshape(2, 2, 2, 1)
    np.savez(p, x=x, y=np.array([1, 0]))
    xs, ys = ds.load_dataset(str(p))
    assert xs.dtype == torch.float32 and float(xs.max()) == pytest.approx(7 / 255)
    assert ys.tolist() == [1, 0]
    np.savez(p, images=x.astype(np.float32) / 10, labels=np.array([[1], [0]]))
    xs, ys = ds.load_dataset(str(p))
    assert float(xs.max()) == pytest.approx(0.7) and ys.tolist() == [1, 0]


def test_npz_errors(tmp_path):
    with pytest.raises(VerikitError, match="not found"):
        ds.load_dataset(str(tmp_path / "missing.npz"))
    p = tmp_path / "bad.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(VerikitError, match="expected arrays"):
        ds.load_dataset(str(p))
    np.savez(p, x=np.zeros((3, 2)), y=np.zeros(2))
    with pytest.raises(VerikitError, match="3 inputs but 2 labels"):
        ds.load_dataset(str(p))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(VerikitError, match="not a readable"):
        ds.load_dataset(str(tmp_path / "junk.npz"))
    with pytest.raises(VerikitError, match="unknown dataset"):
        ds.load_dataset("imagenet")


def test_fit_to_model():
    x = torch.rand(3, 28, 28, 1)
    assert ds.fit_to_model(x, (1, 28, 28)).shape == (3, 1, 28, 28)
    assert torch.equal(ds.fit_to_model(x, (1, 28, 28))[:, 0], x[..., 0])
    assert ds.fit_to_model(torch.rand(3, 1, 28, 28), (784,)).shape == (3, 784)
    rgb = torch.rand(2, 32, 32, 3)
    assert torch.equal(ds.fit_to_model(rgb, (3, 32, 32)), rgb.permute(0, 3, 1, 2))
    with pytest.raises(ShapeError, match="expects"):
        ds.fit_to_model(torch.rand(3, 1, 28, 28), (3, 32, 32))
