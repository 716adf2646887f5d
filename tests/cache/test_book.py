"""The one JSON book class behind every cache file: corrupt files, threads, atomic saves, formats."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from sd_scripts_lorax.cache.book import JsonBook
from sd_scripts_lorax.cache.model_hashes import HASHES_FILE, HashBook, model_hashes
from sd_scripts_lorax.cache.phi_cache import NORMS_FILE, load_norm_book
from sd_scripts_lorax.formats.hashing import FileHashes


class IntBook(JsonBook[int]):
    """Non-negative ints under a header, as a test subject."""

    field = "ints"

    def decode(self, raw):
        return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else None


def _book(path: Path) -> IntBook:
    return IntBook(path, {"format": "ints v1"})


@pytest.mark.parametrize("data", [b"", b"{broken", b"[1, 2]", b'"x"', b"null", b"\xff\xfe{}",
                                  b'{"format": "ints v2", "ints": {"a": 1}}',  # foreign header: another format
                                  b'{"format": "ints v1", "ints": [1, 2]}',
                                  b'{"format": "ints v1"}', b"[" * 100_000])
def test_unreadable_or_foreign_file_is_an_empty_book_and_is_replaced(tmp_path, data):
    path = tmp_path / "b.json"
    path.write_bytes(data)
    book = _book(path)
    assert len(book) == 0 and book.get("a") is None
    book.put("b", 2)
    book.save()
    assert json.loads(path.read_text()) == {"format": "ints v1", "ints": {"b": 2}}


def test_malformed_entries_are_dropped_the_others_kept(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"format": "ints v1", "ints": {"a": 1, "b": -1, "c": "x", "d": None, "e": 5}}))
    book = _book(path)
    assert (book.get("a"), book.get("b"), book.get("c"), book.get("d"), book.get("e")) == (1, None, None, None, 5)
    assert len(book) == 2


def test_missing_folder_is_created_and_unchanged_book_writes_nothing(tmp_path):
    path = tmp_path / "deep" / "er" / "b.json"
    book = _book(path)
    book.save()
    assert not path.exists()  # nothing added: nothing written
    book.put("a", 1)
    book.save()
    first = path.read_bytes()
    st = path.stat()
    again = _book(path)
    again.put("a", 1)  # the same value: not a change
    again.save()
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.read_bytes() == first
    assert _book(None).get("a") is None  # in memory only
    mem = _book(None)
    mem.put("a", 1)
    mem.save()
    assert mem.get("a") == 1


def test_threads_writing_one_book_and_books_of_one_file_lose_nothing(tmp_path):
    path = tmp_path / "b.json"
    shared = _book(path)
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        own = _book(path)  # a book of its own, read before the others saved
        barrier.wait()
        for j in range(50):
            shared.put(f"s{i}-{j}", j)
            own.put(f"o{i}-{j}", j)
            if j % 10 == 0:
                own.save()
                shared.save()
        own.save()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.save()
    on_disk = _book(path)
    assert len(on_disk) == 2 * 8 * 50
    assert all(on_disk.get(f"{s}{i}-{j}") == j for s in "so" for i in range(8) for j in range(50))
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # no temporary files left behind


def test_a_failed_save_leaves_the_old_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "b.json"
    book = _book(path)
    book.put("a", 1)
    book.save()
    before = path.read_bytes()
    book.put("b", 2)
    real = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    book.save()  # not an error: costs time on the next run
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["b.json"]
    book.save()  # still dirty: written now
    assert _book(path).get("b") == 2


def test_unwritable_folder_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    book = _book(blocker / "b.json")  # its folder is a file: neither readable nor writable
    book.put("a", 1)
    book.save()
    assert book.get("a") == 1


def test_a_header_needs_a_field():
    with pytest.raises(ValueError):
        JsonBook(None, {"format": "x"})


def test_float_book_file_is_what_earlier_versions_wrote(tmp_path):
    """The files' bytes stay those of the per-cache classes this replaced (old caches stay warm)."""
    book = load_norm_book(tmp_path)
    book.put("k2", 12.5)
    book.put("k1", 0.1 + 0.2)
    book.save()
    want = {"format": "sd-scripts-lorax adapter-norms v1", "values": {"k1": [0.1 + 0.2], "k2": [12.5]}}
    assert (tmp_path / NORMS_FILE).read_text() == json.dumps(want, indent=0)
    assert load_norm_book(tmp_path).get("k1") == (0.1 + 0.2,)


def test_model_hashes_book_reads_the_old_layout_and_drops_bad_entries(tmp_path):
    old = {"key-a": {"sha256": "a" * 64, "legacy": "12345678", "addnet": None},
           "key-b": {"sha256": 5, "legacy": "x"}, "key-c": {"legacy": "x"}, "key-d": "junk"}
    (tmp_path / HASHES_FILE).write_text(json.dumps(old, indent=1, sort_keys=True))
    book = HashBook(tmp_path / HASHES_FILE)
    assert book.get("key-a") == FileHashes("a" * 64, "12345678", None)
    assert (book.get("key-b"), book.get("key-c"), book.get("key-d")) == (None, None, None)


def test_model_hashes_are_remembered_by_file_state(tmp_path, tiny_sd1_single):
    from sd_scripts_lorax.formats.checkpoint import Checkpoint

    cache = tmp_path / "cache"
    with Checkpoint.open(tiny_sd1_single) as ckpt:
        h = model_hashes(ckpt, cache)
        assert h == ckpt.hashes(addnet=False)
        doc = json.loads((cache / HASHES_FILE).read_text())
        ((_, entry),) = doc.items()
        entry["sha256"] = "f" * 64  # a remembered value is served without hashing the file again
        (cache / HASHES_FILE).write_text(json.dumps(doc))
        assert model_hashes(ckpt, cache).sha256 == "f" * 64
        (cache / HASHES_FILE).write_text("{")  # corrupt: hashed again
        assert model_hashes(ckpt, cache) == h
    assert os.path.exists(cache / HASHES_FILE)
