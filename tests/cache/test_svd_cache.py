"""SVD cache: hits, misses, keys, batching of misses, corrupt entries, atomic writes."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from sd_scripts_lorax.cache import svd_cache
from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.lorax import top_bases


class Counter:
    def __init__(self):
        self.calls: list[list[int]] = []

    def many(self, weights, rank):
        def compute(missing):
            self.calls.append(list(missing))
            return [top_bases(weights[i], rank) for i in missing]
        return compute


def test_miss_then_hit_returns_identical_bases(tmp_path):
    w = torch.randn(24, 8, 3, 3)
    calls = []

    def compute():
        calls.append(1)
        return top_bases(w, 6)

    first = svd_cache.get_or_compute(w, 6, tmp_path, compute)
    second = svd_cache.get_or_compute(w.clone(), 6, tmp_path, compute)
    assert len(calls) == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(first.u, second.u) and torch.equal(first.s, second.s) and torch.equal(first.v, second.v)
    assert second.v.shape == (72, 6)


def test_key_depends_on_bytes_dtype_shape_rank_method():
    w = torch.randn(6, 10)
    base = svd_cache.cache_key(w, 4)
    assert svd_cache.cache_key(w.clone(), 4) == base
    w2 = w.clone()
    w2[0, 0] = torch.nextafter(w2[0, 0], torch.tensor(10.0))
    assert svd_cache.cache_key(w2, 4) != base
    assert svd_cache.cache_key(w.half(), 4) != base
    assert svd_cache.cache_key(w.reshape(10, 6), 4) != base
    assert svd_cache.cache_key(w, 5) != base
    assert svd_cache.cache_key(w, 4, method="randomized") != base
    assert svd_cache.cache_key(w, 4, version="other") != base
    # bf16 has no numpy dtype: the raw bytes are still hashed
    assert svd_cache.cache_key(w.bfloat16(), 4) != svd_cache.cache_key(w.half(), 4)
    # non-contiguous views hash their values, not their storage
    assert svd_cache.cache_key(w.T.contiguous(), 4) == svd_cache.cache_key(w.T, 4)


def test_get_many_batches_only_misses(tmp_path):
    ws = [torch.randn(10, 12, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    c = Counter()
    svd_cache.get_many(ws[:2], 3, tmp_path, c.many(ws[:2], 3))
    out = svd_cache.get_many(ws, 3, tmp_path, c.many(ws, 3))
    assert c.calls == [[0, 1], [2, 3, 4]]
    for w, b in zip(ws, out):
        ref = top_bases(w, 3)
        assert torch.equal(b.u, ref.u) and torch.equal(b.v, ref.v)
    out = svd_cache.get_many(ws, 3, tmp_path, c.many(ws, 3))
    assert len(c.calls) == 2


def test_no_cache_dir_just_computes(tmp_path):
    ws = [torch.randn(4, 4)]
    c = Counter()
    svd_cache.get_many(ws, 2, None, c.many(ws, 2))
    svd_cache.get_many(ws, 2, None, c.many(ws, 2))
    assert c.calls == [[0], [0]]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "nan"])
def test_corrupt_entry_is_recomputed(tmp_path, damage):
    w = torch.randn(12, 20)
    svd_cache.get_or_compute(w, 4, tmp_path, lambda: top_bases(w, 4))
    (entry,) = tmp_path.glob("*.safetensors")
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:40])
    elif damage == "garbage":
        entry.write_bytes(b"\xff" * 100)
    else:
        from safetensors.torch import save_file
        bad = top_bases(w, 3) if damage == "wrong_shape" else top_bases(w, 4)
        s = bad.s.clone()
        if damage == "nan":
            s[0] = float("nan")
        save_file({"u": bad.u, "s": s, "v": bad.v}, str(entry))
    calls = []
    got = svd_cache.get_or_compute(w, 4, tmp_path, lambda: calls.append(1) or top_bases(w, 4))
    assert calls == [1]
    assert torch.equal(got.u, top_bases(w, 4).u)
    # and the entry was repaired
    svd_cache.get_or_compute(w, 4, tmp_path, lambda: calls.append(1) or top_bases(w, 4))
    assert calls == [1]


def test_failed_compute_leaves_no_entry(tmp_path):
    w = torch.randn(5, 5)

    def boom(missing):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        svd_cache.get_many([w], 2, tmp_path, boom)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_created_and_bad_dir_refused(tmp_path):
    w = torch.randn(5, 5)
    nested = tmp_path / "a" / "b"
    svd_cache.get_or_compute(w, 2, nested, lambda: top_bases(w, 2))
    assert len(list(nested.glob("*.safetensors"))) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoraxInputError, match="SVD cache folder"):
        svd_cache.get_or_compute(w, 2, blocker / "sub", lambda: top_bases(w, 2))


def test_hashing_is_fast():
    w = torch.randn(64 * 1024 * 1024 // 4)  # 64 MiB
    t = time.perf_counter()
    svd_cache.cache_key(w, 32)
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0, f"hashing 64 MiB took {elapsed:.2f}s"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_matches_elementwise_check(dtype):
    from sd_scripts_lorax.formats.finite import all_finite
    big = torch.finfo(dtype).max
    cases = [torch.randn(7, 5), torch.zeros(0), torch.full((4,), big, dtype=dtype),
             torch.tensor([big, big, -big], dtype=dtype)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(50)
        t[17] = bad
        cases.append(t)
    both = torch.randn(9)
    both[2], both[5] = float("inf"), -float("inf")  # sums to NaN, not to a finite value
    cases.append(both)
    for t in cases:
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
    assert all_finite(torch.arange(5))


def test_read_tensors_equals_safetensors_reader(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(3)
    tensors = {"u": torch.randn(7, 3, generator=g), "s": torch.rand(3, generator=g),
               "h": torch.randn(2, 3, 1, 1, generator=g).half(), "b": torch.randn(5, generator=g).bfloat16(),
               "odd": torch.randn(3, generator=g).half(), "x": torch.randn(2, 2, generator=g).double(),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"key": "k"})
    got = svd_cache.read_tensors(path)
    ref = load_file(str(path))
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
        # own storage each: keeping u alive must not keep v's bytes alive
        assert got[name].untyped_storage().nbytes() == t.numel() * t.element_size(), name
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError):
        svd_cache.read_tensors(path)


def test_truncated_entry_is_recomputed(tmp_path):
    w = torch.randn(12, 9)
    calls = []

    def compute():
        calls.append(1)
        return top_bases(w, 4)

    first = svd_cache.get_or_compute(w, 4, tmp_path, compute)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:-7])
    again = svd_cache.get_or_compute(w, 4, tmp_path, compute)
    assert len(calls) == 2 and torch.equal(first.u, again.u)
    assert torch.equal(svd_cache.get_or_compute(w, 4, tmp_path, compute).v, first.v) and len(calls) == 2


# ---------------------------------------------------------------- content keys, tensor index, phi book


def test_content_key_and_entry_key():
    from sd_scripts_lorax.cache.tensor_index import content_key

    w = torch.randn(8, 6)
    assert content_key(w) == content_key(w.clone())
    others = [w.half(), w.reshape(6, 8), w + 1e-3, w.T.contiguous().T]
    assert content_key(others[3]) == content_key(w)  # layout does not matter, the values do
    assert len({content_key(w), *(content_key(o) for o in others[:3])}) == 4
    assert svd_cache.cache_key(w, 4) == svd_cache.entry_key(content_key(w), 4)
    assert svd_cache.entry_key(content_key(w), 4) != svd_cache.entry_key(content_key(w), 5)


def test_lookup_and_store_by_content_key(tmp_path):
    from sd_scripts_lorax.cache.tensor_index import content_key

    w = torch.randn(12, 10)
    ck = content_key(w)
    assert svd_cache.lookup(ck, (12, 10), 4, tmp_path) is None
    b = top_bases(w, 4)
    svd_cache.store(ck, 4, b, tmp_path)
    got = svd_cache.lookup(ck, (12, 10), 4, tmp_path)
    assert torch.equal(got.u, b.u) and torch.equal(got.s, b.s) and torch.equal(got.v, b.v)
    assert svd_cache.lookup(ck, (12, 11), 4, tmp_path) is None  # shapes must fit
    # the weight-keyed API finds the same entry
    assert torch.equal(svd_cache.get_or_compute(w, 4, tmp_path, lambda: None).u, b.u)


def test_tensor_index_round_trip_stale_and_corrupt(tmp_path):
    from sd_scripts_lorax.cache.tensor_index import INDEX_DIR, TensorIndex

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x" * 100)
    cache = tmp_path / "cache"
    idx = TensorIndex.load(cache, model)
    assert idx.get("k") is None
    idx.put("k", None, "a" * 64)
    idx.put("k", (0, 4), "b" * 64)
    idx.save()
    again = TensorIndex.load(cache, model)
    assert again.get("k") == "a" * 64 and again.get("k", (0, 4)) == "b" * 64 and again.get("k", (4, 8)) is None
    (file,) = (cache / INDEX_DIR).iterdir()
    doc = json.loads(file.read_text())
    doc["tensors"]["k"]["finite"] = False  # a damaged entry is dropped, the others kept
    file.write_text(json.dumps(doc))
    idx2 = TensorIndex.load(cache, model)
    assert idx2.get("k") is None and idx2.get("k", (0, 4)) == "b" * 64
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file: a fresh index
    assert len(TensorIndex.load(cache, model)) == 0
    file.write_text("{broken")
    assert len(TensorIndex.load(cache, model)) == 0
    assert len(TensorIndex.load(None, model)) == 0


def test_phi_and_norm_books_round_trip_and_corrupt(tmp_path):
    from sd_scripts_lorax.cache.phi_cache import PHI_FILE, load_norm_book, load_phi_book, norm_key, phi_key

    k = phi_key("a" * 64, "b" * 64, 4, 8, "auto", "v")
    assert k != phi_key("a" * 64, "b" * 64, 4, 4, "auto", "v") != phi_key("b" * 64, "a" * 64, 4, 8, "auto", "v")
    book = load_phi_book(tmp_path)
    book.put(k, 0.1 + 0.2, 1.0 / 3.0)
    book.put("bad", 0.5, 1.5)
    book.save()
    again = load_phi_book(tmp_path)
    assert again.get(k) == (0.1 + 0.2, 1.0 / 3.0)  # floats round-trip exactly
    assert again.get("bad") is None  # phi > 1 is not a phi: dropped on reading
    norms = load_norm_book(tmp_path)
    nk = norm_key("stat", "lora_unet_x")
    assert nk != norm_key("stat2", "lora_unet_x")
    norms.put(nk, 12.5)
    norms.save()
    assert load_norm_book(tmp_path).get(nk) == (12.5,) and load_phi_book(tmp_path).get(nk) is None
    (tmp_path / PHI_FILE).write_text("[1, 2")
    assert load_phi_book(tmp_path).get(k) is None
    assert load_phi_book(None).get(k) is None
