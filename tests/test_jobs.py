"""Embedding jobs: real images -> Parquet (locally and on a local Ray), resume, errors, registries from it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow", reason="embedding jobs need the 'jobs' extra: pip install -e '.[jobs]'")
import pyarrow.parquet as pq  # noqa: E402

from fewshot import EncoderMismatchError, FewShotClassifier, Registry, create_encoder  # noqa: E402
from fewshot.cli import main  # noqa: E402
from fewshot.jobs import (embed_to_parquet, list_sources, part_files, read_embeddings,  # noqa: E402
                          register_embeddings)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (each start costs seconds), shut down at the end."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs the 'jobs' extra: pip install -e '.[jobs]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(caltech_subset, tmp_path_factory) -> Path:
    """4 Caltech classes x 4 photos, and one class holding a JPEG cut in half."""
    root = tmp_path_factory.mktemp("job-images")
    for folder in sorted(caltech_subset.iterdir())[:4]:
        (root / folder.name).mkdir()
        for photo in sorted(folder.iterdir())[:4]:
            shutil.copy(photo, root / folder.name / photo.name)
    first = sorted(root.iterdir())[0]
    data = next(first.iterdir()).read_bytes()
    (first / "broken.jpg").write_bytes(data[: len(data) // 3])
    return root


@pytest.fixture(scope="module")
def local_out(images, encoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "emb.parquet"
    report = embed_to_parquet(images, out, encoder=encoder, progress=False)
    assert (report.written, report.failed, report.skipped) == (17, 1, 0)
    return out


def _rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out)
    return {row["path"]: row for row in table.to_pylist()}


def test_parquet_holds_path_hash_class_embedding_and_fingerprint(local_out, images, encoder):
    rows = _rows(local_out)
    assert len(rows) == 17
    good = [r for r in rows.values() if r["error"] is None]
    photo = good[0]
    assert Path(photo["path"]).parent.name == photo["class"]
    assert photo["sha256"] == hashlib.sha256(Path(photo["path"]).read_bytes()).hexdigest()
    schema = pq.read_schema(part_files(local_out)[0])
    kind = schema.field("embedding").type
    assert (kind.list_size, str(kind.value_type)) == (encoder.dim, "float")
    assert json.loads(schema.metadata[b"fewshot.encoder"]) == encoder.fingerprint
    expected = encoder.embed([Path(p) for p in sorted(r["path"] for r in good)])
    got = np.array([rows[p]["embedding"] for p in sorted(r["path"] for r in good)], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_corrupt_image_lands_in_the_errors_column(local_out):
    broken = [r for r in _rows(local_out).values() if r["path"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["embedding"] is None
    assert "broken.jpg" in broken[0]["error"]


def test_ray_engine_writes_the_same_embeddings_as_the_local_one(ray_local, images, local_out, encoder, tmp_path):
    out = tmp_path / "ray.parquet"
    report = embed_to_parquet(images, out, encoder=encoder, engine="ray", actors=2, batch_size=4, progress=False)
    assert (report.written, report.failed) == (17, 1)
    ray_rows, local_rows = _rows(out), _rows(local_out)
    assert set(ray_rows) == set(local_rows)
    for path, row in local_rows.items():
        other = ray_rows[path]
        assert (other["sha256"], other["class"], other["error"] is None) == (row["sha256"], row["class"],
                                                                           row["error"] is None)
        if row["embedding"] is not None:
            np.testing.assert_allclose(other["embedding"], row["embedding"], atol=1e-4)


def test_resume_skips_what_is_written(images, encoder, tmp_path):
    out = tmp_path / "emb.parquet"
    first = sorted(images.iterdir())[:2]
    embed_to_parquet([str(p) for p in first], out, encoder=encoder, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in part_files(out)}
    report = embed_to_parquet(images, out, encoder=encoder, part_rows=5, progress=False)
    assert report.skipped == len(list_sources(first))
    assert report.written == 17 - report.skipped
    assert {p.name: p.stat().st_mtime_ns for p in part_files(out) if p.name in before} == before  # untouched
    assert len(_rows(out)) == 17
    again = embed_to_parquet(images, out, encoder=encoder, progress=False)
    assert (again.written, again.skipped) == (0, 17)


def test_resume_with_another_encoder_is_refused(local_out, images):
    other = create_encoder(input_size=160)
    with pytest.raises(EncoderMismatchError, match="another encoder"):
        embed_to_parquet(images, local_out, encoder=other, progress=False)


def test_registry_from_parquet_predicts_like_one_built_from_images(local_out, images, encoder, tmp_path):
    from_images = FewShotClassifier(encoder, cache=False)
    for folder in sorted(images.iterdir()):
        from_images.register(folder.name, folder)
    from_parquet = FewShotClassifier(encoder, cache=False)
    counts = register_embeddings(from_parquet.registry_, local_out)
    assert counts == {"classes": 4, "images": 16, "unlabelled": 0, "failed": 1}
    assert from_parquet.counts == from_images.counts
    queries = [p for p in sorted(images.rglob("*.jpg")) if p.name != "broken.jpg"]
    a, b = from_images.predict(queries, top_k=4), from_parquet.predict(queries, top_k=4)
    assert [p.label for p in a] == [p.label for p in b]
    np.testing.assert_allclose([p.score for p in a], [p.score for p in b], atol=1e-4)


def test_one_image_classes_go_in_through_add_many(encoder, images, tmp_path):
    singles = [str(sorted(folder.iterdir())[-1]) for folder in sorted(images.iterdir())]
    out = tmp_path / "singles.parquet"
    embed_to_parquet(singles, out, encoder=encoder, progress=False)  # a list of files: no classes
    table = read_embeddings(out)
    assert table.labels == [None] * 4
    reg = Registry(encoder.dim, fingerprint=encoder.fingerprint)
    assert register_embeddings(reg, out)["unlabelled"] == 4 and len(reg) == 0


def test_embeddings_of_another_encoder_are_refused(local_out, encoder):
    other = Registry(encoder.dim, fingerprint={**encoder.fingerprint, "weights_sha256": "0" * 64})
    with pytest.raises(EncoderMismatchError, match="embed the images again"):
        register_embeddings(other, local_out)
    assert len(other) == 0


def test_cli_embed_then_register_from_embeddings(images, tmp_path, capsys):
    out, reg = tmp_path / "cli.parquet", tmp_path / "reg"
    assert main(["embed", str(images), "--out", str(out), "--no-progress"]) == 0
    assert "17 written (1 failed)" in capsys.readouterr().out
    assert main(["register", str(reg), "--from-embeddings", str(out)]) == 0
    assert "4 classes" in capsys.readouterr().out
    listed = subprocess.run([sys.executable, "-m", "fewshot", "classes", str(reg), "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert sorted(c["label"] for c in json.loads(listed.stdout)) == sorted(p.name for p in images.iterdir())
    prediction = FewShotClassifier.load(reg, cache=False).predict(next(sorted(images.iterdir())[1].iterdir()))
    assert prediction[0].label == sorted(images.iterdir())[1].name


def test_cli_register_from_embeddings_refuses_another_encoder(local_out, tmp_path, encoder, capsys):
    reg = Registry(encoder.dim, fingerprint={**encoder.fingerprint, "name": "other"})
    reg.save(tmp_path / "reg")
    assert main(["register", str(tmp_path / "reg"), "--from-embeddings", str(local_out)]) == 1
    assert "embed the images again" in capsys.readouterr().err


def test_zip_input_reads_members_with_classes(omniglot_small, tmp_path):
    sources = list_sources(omniglot_small)
    assert all(s.zip == str(omniglot_small) and s.member and s.group for s in sources[:5])
    assert sources[0].label.startswith(sources[0].group + "/")
    from fewshot.jobs import read_sources

    items, digests, errors = read_sources(sources[:3])
    assert errors == [None] * 3 and all(len(d) == 64 for d in digests)


def _tampered(source: Path, dest: Path, *, table=None, fingerprint: bytes | None = None) -> Path:
    """A copy of the Parquet file ``source`` with its table and/or fingerprint metadata replaced."""
    import pyarrow as pa

    original = pq.read_table(source)
    table = original if table is None else table
    metadata = dict(original.schema.metadata)
    if fingerprint is not None:
        metadata[b"fewshot.encoder"] = fingerprint
    pq.write_table(table.replace_schema_metadata(metadata), dest)
    assert isinstance(table, pa.Table)
    return dest


def test_tampered_embeddings_are_refused_in_one_line_and_save_nothing(images, encoder, tmp_path, capsys):
    import pyarrow as pa

    out = tmp_path / "emb.parquet"
    assert main(["embed", str(images), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    table = pq.read_table(out)
    at = table.schema.get_field_index
    vectors = table.column("embedding").to_pylist()
    variable = pa.array([v if v is None else v[: 100 + i] for i, v in enumerate(vectors)], pa.list_(pa.float32()))
    narrow = pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(len(vectors) * 8, np.float32)), 8)
    classes, good = table.column("class").to_pylist(), table.column("error").to_pylist().index(None)
    huge_label = pa.array(classes[:good] + ["x" * 10_000_000] + classes[good + 1:], pa.string())
    fingerprint = json.loads(table.schema.metadata[b"fewshot.encoder"])
    cases = {
        "variable-length vectors": (dict(table=table.set_column(at("embedding"), "embedding", variable)),
                                    "column 'embedding'"),
        "wrong-dimension vectors": (dict(table=table.set_column(at("embedding"), "embedding", narrow)),
                                    "column 'embedding'"),
        "missing class column": (dict(table=table.drop_columns(["class"])), "no 'class' column"),
        "malformed fingerprint": (dict(fingerprint=b"{not json"), "encoder fingerprint"),
        "fingerprint of another shape": (dict(fingerprint=json.dumps(
            {**fingerprint, "features": {**fingerprint["features"], "dim": 8}}).encode()), "column 'embedding'"),
        "forged fingerprint": (dict(fingerprint=json.dumps({**fingerprint, "weights_sha256": "0" * 64}).encode()),
                               "embed the images again"),
        "a 10 MB label": (dict(table=table.set_column(at("class"), "class", huge_label)), "invalid class label"),
    }
    for name, (tamper, message) in cases.items():
        bad, reg = _tampered(out, tmp_path / f"{name}.parquet", **tamper), tmp_path / f"reg {name}"
        code = main(["register", str(reg), "--from-embeddings", str(bad)])
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("fewshot: error: "), (name, captured.err[:300])
        assert message in lines[0] and len(lines[0]) < 1000 and "Traceback" not in captured.err, (name, lines[0])
        assert captured.out == "" and not reg.exists(), name  # nothing saved, nothing left behind
    assert main(["register", str(tmp_path / "good"), "--from-embeddings", str(out)]) == 0


def _terminal_lines(shown: str) -> list[str]:
    """What a terminal showed, one entry per line or progress-bar redraw, blanks dropped."""
    return [line.strip() for line in shown.replace("\r", "\n").split("\n") if line.strip()]


def test_cli_embed_on_ray_shows_fewshot_progress_and_none_of_rays_logs(images, tmp_path, run_on_a_terminal):
    """`fewshot embed --engine ray` as a user runs it (its own local Ray, stderr on a terminal): the terminal
    shows fewshot's progress bar and fewshot's own messages, none of Ray's start-up, progress or tuning lines."""
    status, out, shown = run_on_a_terminal("embed", images, "--out", tmp_path / "emb", "--engine", "ray")
    assert status == 0 and "17 written (1 failed)" in out, shown
    lines = _terminal_lines(shown)
    assert any(line.startswith("embedding (ray): 100%") for line in lines), shown
    assert all(line.startswith(("embedding (ray)", "fewshot: ")) for line in lines), shown


def test_cli_embed_verbose_lets_rays_logs_through(ray_local, images, tmp_path, run_on_a_terminal):
    # connects to the session's Ray rather than starting another one
    address = ray_local.get_runtime_context().gcs_address
    status, out, shown = run_on_a_terminal("embed", images, "--out", tmp_path / "emb", "--engine", "ray",
                                           "--address", address, "--verbose")
    assert status == 0 and "17 written (1 failed)" in out, shown
    assert any("Execution plan of Dataset" in line for line in _terminal_lines(shown)), shown
