"""One schema: unknown keys and wrong types fail with the dotted key named."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hvae.settings.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["stage1.epochs=3", "cluster.num_workers=1", "vqvae2.codebook_size=[8, 16]",
                             "tracking.experiment=demo", "cluster.address=auto"])
    assert cfg.stage1.epochs == 3 and cfg.cluster.num_workers == 1
    assert cfg.vqvae2.codebook_size == [8, 16] and cfg.tracking.experiment == "demo"
    assert cfg.tracking.uri == "sqlite:///mlruns.db" and cfg.cluster.address == "auto"


def test_an_even_pixelcnn_kernel_is_named_before_any_work():
    for overrides, key in ((["priors.kernel=4"], "priors.kernel"),
                           (["stage1.model=pixelvae", "pixelvae.kernel=6"], "pixelvae.kernel")):
        with pytest.raises(ConfigError, match=rf"{key}: .*must be odd"):
            load_config(None, overrides)


@pytest.mark.parametrize("override,key", [
    ("stage1.epochz=3", "stage1.epochz: unknown key (did you mean epochs?)"),
    ("bogus.x=1", "bogus: unknown key"),
    ("trian.keep=last", "trian: unknown key (did you mean train?)"),
    ("nvae.scale=2", "nvae.scale: unknown key (did you mean scales?)"),
    ("stage1.epochs=abc", "stage1.epochs: Input should be a valid integer"),
    ("cluster.use_gpu=maybe", "cluster.use_gpu: Input should be a valid boolean"),
    ("data.dataset=svhn", "data.dataset: Input should be"),
    ("stage1.lr=-1", "stage1.lr: Input should be greater than 0"),
    ("vqvae2.codebook_size=[8, 8, 8]", "vqvae2: codebook_size lists 3 sizes for 2 levels"),
    ("stage1.model=pixelrnn", "stage1.model: unknown model family 'pixelrnn' (families: nvae, pixelvae, vae, vqvae2)"),
    ("nvae.scales=x", "nvae.scales: Input should be a valid integer"),
])
def test_bad_keys_and_types_are_named(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config error: ")
    assert key in msg


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("vqvae2:\n  levels: 2\n  hidden: sixty\n")
    with pytest.raises(ConfigError, match=r"vqvae2.hidden: Input should be a valid integer"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage1:\n  epochs: 2\n  lr: [1e-3\npriors:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml, line 4, column 7: not valid YAML: expected ',' or ']'"):
        load_config(p)


def test_a_batch_larger_than_the_training_split_is_refused_before_any_work(tmp_path):
    """The smoke config's training split has a few hundred images: a batch of 5,000 cannot mean what it says."""
    run = [sys.executable, "-m", "hvae", "run", str(ROOT / "configs/smoke.yaml"), "data.dataset=mnist5k",
           f"cluster.storage_path={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'db'}"]
    for extra in (["priors.batch_size=5000"], ["priors.batch_size=5000", "--dry-run"]):
        proc = subprocess.run(run + extra, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert re.fullmatch(r"error: priors.batch_size=5000 is larger than the training split of data.dataset="
                            r"mnist5k \(\d+ images\): lower it, or give the dataset more images",
                            proc.stdout.strip().splitlines()[-1]), proc.stdout
    assert not (tmp_path / "db").exists()  # nothing started


def test_a_missing_sample_classifier_is_named_before_any_work(tmp_path):
    run = [sys.executable, "-m", "hvae", "run", str(ROOT / "configs/smoke.yaml"), "sample.classifier=no/digits.pt",
           f"cluster.storage_path={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'db'}"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (
        f"error: sample.classifier: no file {tmp_path / 'no/digits.pt'} (`make classifier` trains the MNIST "
        f"classifier once and writes data/mnist_classifier.pt)")
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("command", [["resume", "0123abcd"], ["report"]])
def test_looking_at_a_store_that_is_not_there_creates_none(tmp_path, command):
    proc = subprocess.run([sys.executable, "-m", "hvae", *command], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: no MLflow store at sqlite:///{tmp_path.resolve()}/mlruns.db " \
        "(run `hvae run` there first, or name one with --uri)"
    assert list(tmp_path.iterdir()) == []


def test_image_size_must_fit_the_levels():
    with pytest.raises(ConfigError, match="data.image_size=36 must be a multiple of 8"):
        load_config(None, ["data.image_size=36"])


def test_binarized_data_asks_for_the_bernoulli_likelihood_and_a_grayscale_array_dataset():
    with pytest.raises(ConfigError, match=r"data.binarize=dynamic makes binary images: set stage1.likelihood=bernoulli"):
        load_config(None, ["data.binarize=dynamic"])
    with pytest.raises(ConfigError, match=r"data.binarize=static: for the grayscale array datasets .* not cifar10"):
        load_config(None, ["data.binarize=static", "stage1.likelihood=bernoulli", "data.dataset=cifar10"])
    assert load_config(None, ["data.binarize=static", "stage1.likelihood=bernoulli"]).data.binarize == "static"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_names_its_command(path):
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# hvae ") and path.name in first


def test_cli_fails_before_any_work_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "hvae", "run", str(ROOT / "configs/smoke.yaml"),
                           "stage1.epochz=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: stage1.epochz: unknown key (did you mean epochs?)"
    assert proc.stdout == ""


def test_cli_dry_run_prints_config_and_stages(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hvae", "run", str(ROOT / "configs/smoke.yaml"),
                           "--dry-run", "stage1.epochs=7"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 7" in proc.stdout and "#   stage1" in proc.stdout
    assert not (tmp_path / "mlruns.db").exists()  # a dry run starts nothing


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage1:\n  lr: 1e-3\n")
    assert load_config(p).stage1.lr == 1e-3
    assert load_config(None, ["stage1.lr=2e-4"]).stage1.lr == 2e-4


def test_extends_merges_the_base_file_underneath(tmp_path):
    (tmp_path / "base.yaml").write_text("stage1:\n  epochs: 7\nvqvae2:\n  hidden: 32\npriors:\n  epochs: 2\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\nvqvae2:\n  hidden: 16\n")
    cfg = load_config(tmp_path / "top.yaml", ["priors.epochs=3"])
    assert (cfg.stage1.epochs, cfg.vqvae2.hidden, cfg.priors.epochs) == (7, 16, 3)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere.yaml \(extended by"):
        load_config(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("override,message", [
    ("sweep.space={stage1.lr: {grid: [-1]}}", "sweep.space.stage1.lr.grid value -1: stage1.lr: Input should be greater than 0"),
    ("sweep.space={priors.lr: {grid: [0.1]}}", "'priors.lr' is not a setting of stage1"),
    ("sweep.space={nvae.hidden: {grid: [8]}}", "'nvae.hidden' is not a setting of stage1 (its sections: stage1, vqvae2, train)"),
    ("sweep.space={stage1.lr: {normal: [0, 1]}}", "must be one of {grid|choice|uniform|loguniform"),
    ("sweep.space={stage1.lr: {loguniform: [0, 1]}}", "loguniform needs low > 0"),
    ("sweep.space={stage1.lr: {uniform: [2, 1]}}", "must be [low, high] with low < high"),
    ("sweep.space={vqvae2.hidden: {uniform: [8, 64]}}", "vqvae2.hidden: Input should be a valid integer"),
    ("sweep.num_samples=3", "num_samples > 1 with a grid-only space"),
    ("sweep.stage=priors", "'stage1.lr' is not a setting of priors"),
    ("sweep.stage=extract", "'extract' is not a training stage"),
    ("sweep.metric=val_kl_bpd", "sweep.metric 'val_kl_bpd' is not reported by stage1 each epoch"),
])
def test_sweep_sections_are_checked_before_any_trial(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "sweep_smoke.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_old_stage1_model_keys_are_read_with_one_deprecation_line(tmp_path, capfd):
    p = tmp_path / "old.yaml"
    p.write_text("stage1:\n  epochs: 3\n  levels: 1\n  codebook_size: 32\n")
    cfg = load_config(p)
    assert (cfg.vqvae2.levels, cfg.vqvae2.codebook_size, cfg.stage1.epochs) == (1, 32, 3)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage1.{levels,codebook_size}" in err[0] and "vqvae2" in err[0]
    with pytest.raises(ConfigError, match="use stage1.model=vae"):
        load_config(None, ["stage1.model=nvae", "nvae.residual_posterior=false"])


def test_a_family_section_shapes_only_its_own_fingerprints():
    from hvae.pipeline.plan import plan

    def fps(*overrides):
        return {p.name: p.fingerprint for p in plan(load_config(None, list(overrides)), "data")}

    vq, nvae = fps(), fps("stage1.model=nvae")
    assert fps("nvae.hidden=16") == vq  # an NVAE key does not touch the VQ-VAE-2 stages
    assert fps("stage1.model=nvae", "vqvae2.hidden=16") == nvae  # nor a VQ key the NVAE's
    assert fps("stage1.model=nvae", "nvae.hidden=16")["stage1"] != nvae["stage1"]
    changed = fps("vqvae2.hidden=16")
    assert all(changed[s] != vq[s] for s in vq)  # stage 1 changed, and everything downstream of it
    assert list(nvae) == ["stage1", "sample", "evaluate"]


def test_the_cli_knows_the_graphs_stages_and_the_families():
    from hvae.settings import graph
    from hvae.pipeline.cli import parse_args
    from hvae.stages import families

    assert [parse_args(["run", "--until", name]).until for name in graph.names()] == list(graph.names())
    with pytest.raises(SystemExit):
        parse_args(["run", "--until", "nope"])
    assert families.names() == ["nvae", "pixelvae", "vae", "vqvae2"]
    for name in families.names():  # every family's stages are stages of the graph, in the graph's order
        order = [s for s in graph.names() if s in families.get(name).stages]
        assert list(families.get(name).stages) == order


def test_sweep_cli_errors_name_the_key_and_start_nothing(tmp_path):
    from conftest import hvae

    bad = hvae(tmp_path, "sweep", str(ROOT / "configs" / "sweep_smoke.yaml"), "sweep.metric=val_accuracy")
    assert bad.returncode == 2 and "sweep.metric 'val_accuracy' is not reported by stage1" in bad.stderr
    none = hvae(tmp_path, "sweep", str(ROOT / "configs" / "smoke.yaml"))
    assert none.returncode == 2 and "no sweep section" in none.stderr
    assert not (tmp_path / "mlruns.db").exists()  # nothing started


def test_num_workers_auto_is_one_worker_per_node_with_its_cpus_or_one_per_gpu():
    from hvae.settings.config import ClusterConfig
    from hvae.pipeline.raycluster import layout_for, resolve_layout

    auto = ClusterConfig(num_workers="auto", cpus_per_worker=3)
    one = layout_for(auto, [{"CPU": 2.0, "memory": 1e9}])  # this machine: one process, two threads
    assert (one.num_workers, one.cpus_per_worker) == (1, 2.0)
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 0.0}]  # (a head without CPUs)
    cpus = layout_for(auto, nodes)
    assert (cpus.num_workers, cpus.cpus_per_worker) == (2, 8.0)
    gpus = layout_for(auto.model_copy(update={"use_gpu": True}), nodes)
    assert (gpus.num_workers, gpus.cpus_per_worker) == (6, 4.0)
    fixed = ClusterConfig(num_workers=3, cpus_per_worker=2)
    assert resolve_layout(fixed) is fixed  # a count given is kept (and Ray is not asked)
    with pytest.raises(ConfigError, match="cluster.num_workers"):
        load_config(None, ["cluster.num_workers=many"])


def test_top_help_has_examples_and_no_markup_and_the_version_is_shown():
    from importlib.metadata import version

    shown = subprocess.run([sys.executable, "-m", "hvae", "--version"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip() == f"hvae {version('hvae')}"
    helped = subprocess.run([sys.executable, "-m", "hvae", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "``" not in helped.stdout
    assert "examples:" in helped.stdout and "hvae run configs/default.yaml" in helped.stdout


def test_every_argument_of_every_command_says_what_it_is():
    import argparse

    from hvae.pipeline.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in commands.choices.items()
              for a in p._actions if not a.help]
    assert silent == []


def test_hvae_config_prints_the_resolved_config_of_its_family_only():
    import yaml

    proc = subprocess.run([sys.executable, "-m", "hvae", "config", str(ROOT / "configs/nvae.yaml"), "stage1.epochs=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)  # (the header line is a YAML comment)
    assert shown["stage1"]["epochs"] == 3 and shown["stage1"]["model"] == "nvae" and "nvae" in shown
    assert not {"vqvae2", "vae", "extract", "priors", "sweep"} & set(shown)  # not this family's, or not set
    vq = yaml.safe_load(subprocess.run([sys.executable, "-m", "hvae", "config"], capture_output=True, text=True,
                                       timeout=120).stdout)
    assert {"vqvae2", "extract", "priors"} <= set(vq) and not {"nvae", "vae"} & set(vq)


def test_a_data_root_the_dataset_would_not_read_is_an_error():
    with pytest.raises(ConfigError, match=r"data.root=/photos is set, but data.dataset=mnist5k .* set data.dataset=imagefolder"):
        load_config(None, ["data.root=/photos"])
    assert load_config(None, ["data.dataset=imagefolder", "data.root=/photos"]).data.root == "/photos"
