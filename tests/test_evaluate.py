"""End-to-end tests of `rdkd evaluate` and `rdkd report` on the tiny teacher and datasets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import make_image, run_cli
from rdkd import metrics
from rdkd.errors import UserError
from rdkd.stages.evaluate import ZeroShotTask, evaluate
from rdkd.stages.report import mean_std, report


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, csv_dataset, tiny_teacher) -> Path:
    from rdkd.stages.extract_teacher import extract_teacher

    out = tmp_path_factory.mktemp("eval-cache") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, batch_size=8, workers=0, device="cpu",
                    storage_dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def teacher_cache_3_views(tmp_path_factory, csv_dataset, tiny_teacher) -> Path:
    """The same teacher cache with 3 views per image: view 0 the eval view, two random crops."""
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    out = tmp_path_factory.mktemp("eval-cache-3-views") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, views=ViewConfig(count=3), batch_size=8, workers=0,
                    device="cpu", storage_dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def zeroshot_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zs") / "tree"
    for c, name in enumerate(["red_fox", "cat", "dog"]):
        (root / name).mkdir(parents=True)
        for j in range(3):
            make_image(100 * c + j).save(root / name / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def teacher_scored(tmp_path_factory, csv_dataset, tiny_teacher, teacher_cache) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval-teacher") / "metrics.json"
    result = evaluate(out, data=csv_dataset, model=tiny_teacher, teacher_cache=teacher_cache,
                      workers=0, batch_size=5, device="cpu", fidelity_sample=50)
    return out, result


def test_teacher_model_files_and_keys(teacher_scored):
    out, result = teacher_scored
    on_disk = json.loads(out.read_text())
    assert on_disk == pytest.approx(result)
    assert all(isinstance(v, float) for v in on_disk.values())  # flat numbers, as dvc metrics wants
    for key in ("retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/i2t_r10", "retrieval/t2i_r10",
                "retrieval/i2t_mean_rank", "retrieval/t2i_median_rank", "fidelity/knn10_img",
                "fidelity/knn10_txt", "fidelity/knn10_img_txt", "fidelity/spearman_img", "fidelity/cka_txt"):
        assert key in result, key
    assert result["retrieval/images"] == 12 and result["retrieval/captions"] == 22
    assert result["retrieval/approximate"] == 0.0
    info = json.loads((out.parent / "evaluation.json").read_text())
    assert info["dataset_fingerprint"] and info["index_factory"] == "Flat"
    run = json.loads((out.parent / "labels.json").read_text())
    assert run == {"method": "open_clip", "student": "tiny-clip", "seed": None, "teacher_forwards": None,
                   "embed_dim": 32, "teachers": None}
    assert info["precision"] == "fp32" and not (out.parent / "run.json").exists()


def test_teacher_against_its_own_cache_has_full_fidelity(teacher_scored):
    _, result = teacher_scored
    for key in ("knn10_img", "knn10_txt", "knn10_img_txt", "spearman_img", "spearman_txt",
                "spearman_img_txt", "cka_img", "cka_txt"):
        assert result[f"fidelity/{key}"] == pytest.approx(1.0, abs=1e-4), key


@pytest.mark.parametrize("views", [1, 3])
def test_cache_scores_like_the_model_it_holds(tmp_path, request, csv_dataset, teacher_scored, views):
    """The cache's view 0 is the teacher's eval view: scored from the cache, with 1 view per
    image or 3, the teacher gets the numbers it gets when evaluate runs it."""
    teacher_cache = request.getfixturevalue("teacher_cache" if views == 1 else "teacher_cache_3_views")
    _, from_model = teacher_scored
    from_cache = evaluate(tmp_path / "m.json", data=csv_dataset, cache=teacher_cache, device="cpu")
    for key, value in from_cache.items():
        assert value == pytest.approx(from_model[key], abs=1e-9), key
    assert json.loads((tmp_path / "labels.json").read_text())["method"] == "teacher"
    whole_cache = evaluate(tmp_path / "all" / "m.json", cache=teacher_cache, device="cpu")
    assert whole_cache == pytest.approx(from_cache)  # the cache holds exactly the eval set


def test_recall_equals_clip_benchmark_on_the_same_model_and_data(tmp_path, csv_dataset, tiny_teacher):
    """clip_benchmark, the evaluator the CLIP literature reports with, scores the same model
    on the same images and captions (its own loader: the model's open_clip preprocess, its
    own encoding and top-K): Recall@1/5/10 equal in both directions."""
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from rdkd.data import decode_image, open_dataset
    from rdkd.models import load_clip

    clip = load_clip(tiny_teacher)
    data = open_dataset(csv_dataset)
    pairs = [(clip.preprocess(decode_image(data.read_image_bytes(i))), list(data.captions(i)))
             for i in range(len(data))]
    loader = torch.utils.data.DataLoader(pairs, batch_size=5, collate_fn=lambda batch: (
        torch.stack([image for image, _ in batch]), [texts for _, texts in batch]))
    theirs = zeroshot_retrieval.evaluate(clip.model.eval(), loader, clip.tokenizer, "cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    ours = evaluate(tmp_path / "m.json", data=csv_dataset, model=tiny_teacher, workers=0, batch_size=5,
                    device="cpu", progress=False)
    captions, images = ours["retrieval/captions"], ours["retrieval/images"]
    for k in (1, 5, 10):  # hits counted: clip_benchmark averages in float32; its "image retrieval" is t2i
        assert round(ours[f"retrieval/t2i_r{k}"] * captions) == round(theirs[f"image_retrieval_recall@{k}"] * captions)
        assert round(ours[f"retrieval/i2t_r{k}"] * images) == round(theirs[f"text_retrieval_recall@{k}"] * images)
    assert 0 < ours["retrieval/t2i_r1"] < ours["retrieval/t2i_r10"] < 1  # the recalls are not trivially 0 or 1


def test_precision_bf16_autocasts_the_forward_and_fp16_needs_cuda(tmp_path, capsys, csv_dataset, tiny_teacher,
                                                                   teacher_cache, teacher_scored):
    _, fp32 = teacher_scored  # default precision: bit-equal to the float32 cache it was extracted into
    bf16 = evaluate(tmp_path / "bf16" / "metrics.json", data=csv_dataset, model=tiny_teacher, precision="bf16",
                    teacher_cache=teacher_cache, workers=0, batch_size=5, device="cpu", fidelity_sample=50,
                    progress=False)
    assert fp32["fidelity/cka_img"] == pytest.approx(1.0, abs=1e-6)
    assert 0.99 < bf16["fidelity/cka_img"] < 1.0 - 1e-6  # bfloat16 rounding moved the embeddings, a little
    assert json.loads((tmp_path / "bf16" / "evaluation.json").read_text())["precision"] == "bf16"
    code, err = run_cli(["evaluate", "--model", tiny_teacher.config, "--pretrained", tiny_teacher.pretrained,
                         "--data", csv_dataset.path, "--device", "cpu", "--precision", "fp16", "--workers", "0",
                         "-o", str(tmp_path / "fp16" / "metrics.json")], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs a CUDA device" in err
    assert not (tmp_path / "fp16").exists()


def test_images_leave_the_workers_as_uint8(csv_dataset, tiny_teacher):
    from rdkd.data import open_dataset
    from rdkd.models import load_clip
    from rdkd.pixels import ViewRenderer
    from rdkd.stages.evaluate import _DecodedImages

    loaded = load_clip(tiny_teacher)
    renderer = ViewRenderer.of_model(loaded.preprocess, loaded.preprocess_cfg)
    index, pixels, reason = _DecodedImages(open_dataset(csv_dataset), renderer.eval_pixels)[3]
    assert (index, reason) == (3, None) and pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)


def test_retrieval_matches_direct_encoding(csv_dataset, tiny_teacher, teacher_scored):
    """The stage's numbers equal the metric function on embeddings encoded by hand (at the
    digits the stage writes)."""
    from rdkd.data import open_dataset
    from rdkd.models import load_clip

    _, result = teacher_scored
    loaded = load_clip(tiny_teacher)
    ds = open_dataset(csv_dataset)
    with torch.no_grad():
        images = loaded.model.encode_image(torch.stack([loaded.preprocess(ds.read_image(i)) for i in range(len(ds))]))
        captions = [c for i in range(len(ds)) for c in ds.captions(i)]
        texts = loaded.model.encode_text(loaded.tokenizer(captions))
    text_image = np.repeat(np.arange(len(ds)), [len(ds.captions(i)) for i in range(len(ds))])
    want = metrics.retrieval_metrics(images, texts, text_image)
    for key, value in want.items():
        assert result[f"retrieval/{key}"] == metrics.as_written(value), key


def test_student_export_with_run_info_and_zero_shot(tmp_path, csv_dataset, tiny_teacher, zeroshot_tree):
    import open_clip

    from rdkd.models import export_clip, load_clip, parse_model_spec

    loaded = load_clip(tiny_teacher)
    run_dir = tmp_path / "students" / "run"
    export_clip(loaded.model, loaded.model_config, run_dir / "export")
    (run_dir / "run.json").write_text(json.dumps({"method": "vrd", "student": "tiny", "seed": 3, "steps": 5,
                                                  "teacher_forwards": 0, "teachers": "big+wide"}))
    task = ZeroShotTask("animals", str(zeroshot_tree), templates="a photo of a {}.|a blurry {c}.")
    out = tmp_path / "eval" / "metrics.json"
    result = evaluate(out, model=parse_model_spec(str(run_dir / "export")), zeroshot=[task], workers=1,
                      device="cpu", per_class=True)
    assert json.loads((out.parent / "labels.json").read_text()) == {"method": "vrd", "student": "tiny", "seed": 3,
                                                                    "teacher_forwards": 0, "embed_dim": 32,
                                                                    "teachers": "big+wide"}
    assert result["zeroshot/animals/images"] == 9
    assert result["zeroshot/animals/top5"] == 1.0  # capped at 3 classes
    # The same answer by hand: class index = sorted folder order, names from the folders
    # ("red_fox" -> "red fox"), open_clip's own classifier builder.
    from PIL import Image

    names = ["cat", "dog", "red fox"]
    files = sorted(zeroshot_tree.rglob("*.png"))
    labels = np.array([["cat", "dog", "red_fox"].index(f.parent.name) for f in files])
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            loaded.model, loaded.tokenizer, names, [lambda c: f"a photo of a {c}.", lambda c: f"a blurry {c}."])
        pixels = torch.stack([loaded.preprocess(Image.open(f).convert("RGB")) for f in files])
        predicted = (loaded.model.encode_image(pixels, normalize=True) @ weights).argmax(dim=1).numpy()
    assert result["zeroshot/animals/top1"] == pytest.approx(np.mean(predicted == labels))
    with open(out.parent / "zeroshot_animals_per_class.csv") as f:
        assert [row["class"] for row in csv.DictReader(f)] == names


def test_zero_shot_from_a_csv_with_class_name_labels(tmp_path, tiny_teacher, zeroshot_tree):
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "label"])
        for file in sorted(zeroshot_tree.rglob("*.png")):
            writer.writerow([str(file), file.parent.name])
    from_csv = evaluate(tmp_path / "a" / "metrics.json", model=tiny_teacher, device="cpu", workers=0,
                        zeroshot=[ZeroShotTask("t", str(table), classnames="cat,dog,red_fox", templates="simple")])
    from_tree = evaluate(tmp_path / "b" / "metrics.json", model=tiny_teacher, device="cpu", workers=0,
                         zeroshot=[ZeroShotTask("t", str(zeroshot_tree), classnames="cat,dog,red_fox",
                                                templates="simple")])
    assert from_csv == pytest.approx(from_tree)


def test_bad_inputs_exit_2_with_one_line_and_keep_old_outputs(tmp_path, capsys, csv_dataset, wds_dataset,
                                                                 tiny_teacher, teacher_cache, zeroshot_tree):
    out = tmp_path / "metrics.json"
    out.write_text('{"retrieval/i2t_r1": 0.5}\n')
    model = ["--model", tiny_teacher.config, "--pretrained", tiny_teacher.pretrained, "--device", "cpu",
             "--workers", "0", "-o", str(out)]
    cases = {
        "another dataset": (["--data", wds_dataset.path, "--teacher-cache", str(teacher_cache)], "another dataset"),
        "empty classes": (["--zeroshot", f"z={zeroshot_tree};classnames=,"], "class list is empty"),
        "no braces": (["--zeroshot", f"z={zeroshot_tree};templates=a photo of a dog"], "has no {}"),
        "bad factory": (["--data", csv_dataset.path, "--index-factory", "IVF,Bogus"], "FAISS rejects"),
        "too few classes": (["--zeroshot", f"z={zeroshot_tree};classnames=a,b"], "3 class folders but 2"),
    }
    for name, (args, message) in cases.items():
        code, err = run_cli(["evaluate", *model, *args], capsys)
        assert code == 2, name
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (name, err)
    code, err = run_cli(["evaluate", "--data", wds_dataset.path, "--cache", str(teacher_cache), "-o", str(out)], capsys)
    assert code == 2 and "another dataset" in err
    assert out.read_text() == '{"retrieval/i2t_r1": 0.5}\n'


def test_a_cache_of_another_size_than_its_manifest_is_refused_before_anything_is_written(
        tmp_path, capsys, csv_dataset, tiny_teacher, teacher_cache):
    """The cache's own size check (TeacherCache.verify(sizes_only=True)), for the scored
    cache and the teacher cache alike."""
    import shutil

    damaged = tmp_path / "cache"
    shutil.copytree(teacher_cache, damaged)
    shard = sorted((damaged / "texts").glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0")
    out = tmp_path / "eval" / "metrics.json"
    model = ["--model", tiny_teacher.config, "--pretrained", tiny_teacher.pretrained, "--workers", "0"]
    for args in (["--cache", str(damaged)], [*model, "--teacher-cache", str(damaged)]):
        code, err = run_cli(["evaluate", "--data", csv_dataset.path, "--device", "cpu", *args, "-o", str(out)],
                            capsys)
        assert code == 2 and err.count("\n") == 1 and "is damaged" in err, err
        assert f"texts/{shard.name}: " in err and "bytes, manifest says" in err
    assert not out.parent.exists()


def test_cache_rows_join_by_key_in_the_order_asked(teacher_cache_3_views):
    """evaluate's join to a cache (one TeacherCache.lookup) gives, key by key, the rows
    TeacherCache.find points at: view 0 and every caption; keys the cache lacks are skipped."""
    from rdkd.cache import TeacherCache
    from rdkd.stages.evaluate import _from_cache

    cache = TeacherCache.open(teacher_cache_3_views)
    keys = cache.image_keys(np.arange(0, cache.num_image_rows, cache.views))
    asked = [keys[5], "absent", keys[0], keys[3], keys[11]]
    rows, found = _from_cache(cache, asked)
    assert rows.keys == [keys[5], keys[0], keys[3], keys[11]] and found.tolist() == [0, 2, 3, 4]
    assert [s["key"] for s in rows.skipped] == ["absent"]
    for row, key in enumerate(rows.keys):
        entry = cache.find(key)
        assert np.array_equal(rows.images[row], cache.image_embeddings([entry.image_rows.start])[0].numpy())
        assert np.array_equal(rows.texts[rows.text_image == row], cache.text_embeddings(list(entry.text_rows)).numpy())
    assert len(set(np.bincount(rows.text_image).tolist())) > 1  # images with different caption counts


def test_approximate_index_marks_results(tmp_path, csv_dataset, teacher_cache):
    result = evaluate(tmp_path / "m.json", data=csv_dataset, cache=teacher_cache, index_factory="HNSW8", device="cpu")
    assert result["retrieval/approximate"] == 1.0 and "retrieval/i2t_mean_rank" not in result


def _write_run(root: Path, method: str, student: str, seed: int | None, values: dict, with_info: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(values))
    if with_info:
        (root / "labels.json").write_text(json.dumps({"method": method, "student": student, "seed": seed}))


def test_report_mean_std_over_seeds(tmp_path):
    runs = tmp_path / "eval"
    for seed, r1 in enumerate([0.2, 0.4, 0.6]):
        _write_run(runs / f"vrd-{seed}", "vrd", "ViT-T-16", seed,
                   {"retrieval/i2t_r1": r1, "retrieval/images": 100, "fidelity/cka_img": 0.9})
    _write_run(runs / "clip-0", "clip", "ViT-T-16", 0, {"retrieval/i2t_r1": 0.1, "zeroshot/imagenet/top1": 0.3})
    # no run.json: labels from the path pattern <method>/<student>/seed<N>/
    _write_run(runs / "xrd" / "RN50" / "seed7", "", "", None, {"retrieval/i2t_r1": 0.5}, with_info=False)
    result = report([str(runs / "**" / "metrics.json")], tmp_path / "report")
    groups = {(g["method"], g["student"]): g for g in result["groups"]}
    vrd = groups[("vrd", "ViT-T-16")]
    assert vrd["n"] == 3 and vrd["seeds"] == [0, 1, 2]
    assert vrd["stats"]["retrieval/i2t_r1"][:2] == pytest.approx((0.4, 0.2))  # sample std of .2 .4 .6
    assert groups[("xrd", "RN50")]["seeds"] == [7]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| vrd | ViT-T-16 | 3 | 0,1,2 | 0.4000 ± 0.2000 |" in md
    assert "| clip | ViT-T-16 | 1 | 0 | 0.1000 |" in md
    assert "images" not in md.split("## Retrieval")[1].split("\n")[2]  # bookkeeping keys stay out of the table
    for name in ("retrieval.png", "zeroshot.png", "fidelity.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "report" / "table.csv") as f:
        rows = {row["label"]: row for row in csv.DictReader(f)}
    assert float(rows["vrd / ViT-T-16"]["retrieval/i2t_r1__std"]) == pytest.approx(0.2)
    with open(tmp_path / "report" / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 5


def test_report_labels_a_run_by_its_labels_json_and_refuses_a_broken_one(tmp_path, capsys):
    _write_run(tmp_path / "a", "vrd", "tiny", 1, {"retrieval/i2t_r1": 0.5})
    _write_run(tmp_path / "b", "vrd", "tiny", 2, {"retrieval/i2t_r1": 0.7})
    result = report([str(tmp_path)], tmp_path / "report")
    assert [(g["method"], g["student"], g["seeds"]) for g in result["groups"]] == [("vrd", "tiny", [1, 2])]
    (tmp_path / "b" / "labels.json").write_text(json.dumps({"seed": 2}))
    code, err = run_cli(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "holds no run labels" in err and len(err.strip().splitlines()) == 1


def test_report_without_inputs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics file matches"):
        report([str(tmp_path / "nothing" / "*.json")], tmp_path / "r")
    assert mean_std([2.0]) == (2.0, 0.0)


def test_zero_shot_task_folder_supplies_its_own_lists(tmp_path):
    folder = tmp_path / "shape"
    (folder / "circle").mkdir(parents=True)
    (folder / "classnames.txt").write_text("circle\n")
    (folder / "templates.txt").write_text("a photo of a {}.\n")
    task = ZeroShotTask.parse(f"shape={folder}")
    assert (task.classnames, task.templates) == (str(folder / "classnames.txt"), str(folder / "templates.txt"))
    named = ZeroShotTask.parse(f"shape={folder};templates=openai")
    assert named.templates == "openai" and named.classnames == str(folder / "classnames.txt")
    (folder / "templates.txt").unlink()
    assert ZeroShotTask.parse(f"shape={folder}").templates == "openai"
