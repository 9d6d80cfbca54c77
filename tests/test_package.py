"""hvae is one package, ``hvae``: a user's own ``models/``, ``stages/`` or ``pipeline.py`` (in the
folder a pipeline starts from, or installed) never stands in for hvae's, on the driver or on a Ray
worker (whose path starts with the driver's folder)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMOKE, hvae, runs

# bottom first: a layer imports only the layers below it (and itself), and the packages listed
LAYERS = ("settings", "models", "stages", "pipeline")
THIRD_PARTY = {  # what each layer may import beside the standard library (pipeline: anything)
    "settings": {"pydantic", "yaml"},
    "models": {"torch"},
    "stages": {"torch", "torchvision", "ray", "numpy", "pyarrow", "PIL", "matplotlib"},  # never MLflow
}

SHADOWS = {  # what a research folder often holds; importing any of them fails loudly
    "models/__init__.py": 'raise ImportError("the user models package was imported")\n',
    "stages/__init__.py": 'raise ImportError("the user stages package was imported")\n',
    "pipeline.py": 'raise ImportError("the user pipeline module was imported")\n',
}


def _package_imports() -> dict[str, set[str]]:
    """{module of hvae: every name it imports}, read by the stage fingerprint's own reader."""
    from hvae.pipeline.fingerprint import ROOT, named_imports

    found = {}
    for path in [ROOT / "__init__.py", ROOT / "__main__.py", *(p for f in LAYERS for p in (ROOT / f).rglob("*.py"))]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(("hvae", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        found[module] = named_imports(path.read_bytes(), path, module)
    return found


def _layer(module: str) -> int:
    """hvae itself (it imports nothing) below everything, ``python -m hvae`` above everything."""
    if module == "hvae":
        return -1
    part = module.split(".")[1]
    return LAYERS.index(part) if part in LAYERS else len(LAYERS)


def test_the_layers_import_one_way_and_no_modules_import_each_other_in_a_circle():
    """Every import of the package, in functions too: none points up a layer, each layer
    imports only its listed third-party packages, and the modules' import graph has no cycle."""
    import sys

    imports = _package_imports()
    assert {"hvae.settings.config", "hvae.models.vqvae2", "hvae.stages.train_loop", "hvae.pipeline.runner"} <= set(imports)
    up, foreign = [], []
    for module, names in imports.items():
        for name in names:
            if name == "hvae" or name.startswith("hvae."):
                target = name if name in imports else name.rpartition(".")[0]  # from pkg import name
                if target in imports and _layer(target) > _layer(module):
                    up.append(f"{module} imports {target}")
            elif module.split(".")[1:2] and module.split(".")[1] in THIRD_PARTY:
                top = name.split(".")[0]
                if top and top not in sys.stdlib_module_names and top != "__future__" \
                        and top not in THIRD_PARTY[module.split(".")[1]]:
                    foreign.append(f"{module} imports {name}")
    assert not up, up
    assert not foreign, foreign

    edges = {m: {n for n in names if n in imports and n != m} for m, names in imports.items()}
    # a package's __init__ runs before its modules, so a module naming its own package is no cycle
    edges = {m: {n for n in e if not m.startswith(f"{n}.")} for m, e in edges.items()}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for target in sorted(edges[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(edges):
        visit(module)


def _plant(folder: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def _nll(cwd: Path, parent: str) -> float:
    client, _ = runs(cwd)
    return client.get_run(parent).data.metrics["test_nll_nats"]  # the parent's headline metric


@pytest.mark.slow
def test_a_pipeline_started_beside_a_users_own_models_stages_and_pipeline_finishes(tmp_path, smoke_store):
    """The research-folder case: the smoke pipeline, started from a folder holding its own
    ``models/``, ``stages/`` and ``pipeline.py``, finishes with the smoke pipeline's NLL."""
    _plant(tmp_path, SHADOWS)
    proc = hvae(tmp_path, "run", SMOKE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "was imported" not in proc.stdout + proc.stderr
    parent = proc.stdout.split("MLflow parent run ")[1][:32]
    home, _, home_parent = smoke_store
    assert _nll(tmp_path, parent) == pytest.approx(_nll(home, home_parent), rel=1e-6)


def test_hvae_installed_beside_other_packages_named_models_stages_and_pipeline(tmp_path):
    """hvae installs no top-level ``models``, ``stages`` or ``pipeline``; with other packages of
    those names on the path, ``python -m hvae`` plans a pipeline (its families, models and
    stages imported) and the other packages stay what ``import models`` gives."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import importlib.util, json; "
             "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in ('models', 'stages', 'pipeline')}))")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=clean, capture_output=True, text=True,
                           timeout=60)
    assert json.loads(found.stdout) == {"models": False, "stages": False, "pipeline": False}, found.stderr

    site = tmp_path / "site"
    _plant(site, {"models/__init__.py": "NAME = 'theirs'\n", "stages/__init__.py": "NAME = 'theirs'\n",
                  "pipeline/__init__.py": "NAME = 'theirs'\n"})
    env = {**clean, "PYTHONPATH": str(site)}
    planned = subprocess.run([sys.executable, "-m", "hvae", "run", SMOKE, "--dry-run"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stdout[-2000:] + planned.stderr[-2000:]
    assert "stage1" in planned.stdout and "evaluate" in planned.stdout
    both = ("import models, stages, pipeline, hvae.models.vqvae2, hvae.stages.stage1, hvae.pipeline.runner; "
            "print(models.NAME, stages.NAME, pipeline.NAME, hvae.models.vqvae2.VQVAE2.__name__)")
    shown = subprocess.run([sys.executable, "-c", both], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert shown.stdout.split() == ["theirs", "theirs", "theirs", "VQVAE2"], shown.stderr[-2000:]


@pytest.mark.slow
def test_one_step_trains_the_configured_global_batch_on_1_and_on_3_workers(tmp_path):
    """The per-worker batch is exactly batch_size / workers: 1 and 3 workers train the same
    images per optimizer step (counted by the loop over every worker), so the two may share a
    fingerprint; a count that does not divide the batch is refused, naming both keys."""
    from hvae.pipeline.tracking import plain

    trained = {}
    for workers in (1, 3):
        cwd = tmp_path / f"w{workers}"
        cwd.mkdir()
        proc = hvae(cwd, "run", SMOKE, "--until", "stage1", "data.limit=240", "stage1.epochs=1",
                    "stage1.batch_size=6", "priors.batch_size=6", f"cluster.num_workers={workers}",
                    "cluster.cpus_per_worker=0.5")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"batches of {6 // workers} per worker on {workers} worker" in proc.stdout
        _, all_runs = runs(cwd)
        (stage1,) = [r for r in all_runs if r.data.tags.get("hvae.stage") == "stage1"]
        trained[workers] = plain(stage1.data.metrics)
    assert trained[1]["images_per_update"] == trained[3]["images_per_update"] == 6.0
    assert trained[1]["optimizer_steps"] == trained[3]["optimizer_steps"] == 40

    refused = hvae(tmp_path, "run", SMOKE, "--dry-run", "stage1.batch_size=64", "cluster.num_workers=3")
    assert refused.returncode != 0
    assert "stage1.batch_size=64 does not split evenly over cluster.num_workers=3" in refused.stderr
    assert "stage1.batch_size=63 or stage1.batch_size=66, or cluster.num_workers=2" in refused.stderr


def test_a_worker_count_known_only_at_run_time_must_divide_the_batch_too():
    """``cluster.num_workers: auto`` is resolved once Ray is up: the task refuses it there."""
    from hvae.settings.base import ConfigError
    from hvae.stages.base import worker_batch

    assert worker_batch("priors.batch_size", 64, 4) == 16
    with pytest.raises(ConfigError, match=r"priors.batch_size=10 does not split evenly over cluster.num_workers=4 "
                                          r".*priors.batch_size=8 or priors.batch_size=12, or cluster.num_workers=2"):
        worker_batch("priors.batch_size", 10, 4)


@pytest.mark.parametrize("name", ["vqvae2", "nvae", "vae", "pixelvae"])
def test_each_family_setting_has_one_default_and_the_built_model_and_task_use_it(name):
    """Every key of a family's section reaches its model or its stage-1 task at the schema's
    default, and the model's constructor declares no default of its own (only the arguments
    that are no settings: the data's real pixels, a lone test model's codebook sync)."""
    import inspect

    from hvae.settings.config import load_config
    from hvae.stages import families

    cfg = load_config(None, [f"stage1.model={name}"])
    family, section = families.get(name), getattr(cfg, name)
    args = family.model_config(cfg, 1)
    used = {**args, **family.task(cfg)[1].get("loss", {})}
    for key, value in section.model_dump().items():
        assert key in used, f"{name}.{key} reaches neither the model nor the task"
        assert used[key] == (section.factors() if (name, key) == ("vqvae2", "downsample") else value), key
    assert (args["likelihood"], args["num_mixtures"]) == (cfg.stage1.likelihood, cfg.stage1.num_mixtures)
    model = family.build(args)
    params = inspect.signature(type(model).__init__).parameters
    assert {p for p, v in params.items() if v.default is not inspect.Parameter.empty} <= {"likelihood_region",
                                                                                          "sync_codebooks"}
    if name == "vqvae2":  # (its constructor's defaults disagreed with the schema's on these three)
        q = model.quantizers[0]
        assert (not bool(q.initialized), q.kmeans_at_step, q.dead_code_fraction) == \
            (section.kmeans_init, section.kmeans_at_step, section.dead_code_fraction) == (True, 50, 0.03)


def test_the_priors_are_built_from_their_section_alone():
    """HierarchicalPrior has no defaults: every model key of ``priors:`` reaches it as configured."""
    import inspect

    from hvae.models.pixelcnn import HierarchicalPrior
    from hvae.settings.config import load_config
    from hvae.stages.priors import prior_config

    pcfg = load_config(None, ["priors.class_conditional=true", "priors.hidden=32"]).priors
    args = prior_config({"codebook_sizes": [8, 16], "shapes": [[4, 4], [8, 8]], "num_classes": 10}, pcfg)
    params = inspect.signature(HierarchicalPrior.__init__).parameters
    assert all(v.default is inspect.Parameter.empty for p, v in params.items() if p != "self")
    assert set(args) == set(params) - {"self"}
    assert {k: args[k] for k in ("hidden", "layers", "kernel", "attention_every", "attention_heads", "dropout")} == \
        pcfg.model_dump(include={"hidden", "layers", "kernel", "attention_every", "attention_heads", "dropout"})
    assert args["num_classes"] == 10


def test_no_function_takes_more_than_six_positional_parameters():
    """Past six (``self`` and ``cls`` aside), a function's parameters are keyword-only: named
    where it is called, so a long list cannot be passed out of order."""
    import ast

    from hvae.pipeline.fingerprint import ROOT

    long = []
    for path in (p for f in LAYERS for p in (ROOT / f).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(names) > 6:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({', '.join(names)})")
    assert not long, long
