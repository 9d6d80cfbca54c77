"""Fingerprints follow the code a stage really runs: computed from imports, one family at a time."""
import shutil

from hvae.pipeline.fingerprint import ROOT, code_hash, source_files

STAGE1 = "hvae.stages.stage1"


def _project(tmp_path):
    for folder in ("models", "stages", "settings"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "__init__.py", tmp_path / "__init__.py")  # the package hvae's own file
    return tmp_path


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_editing_the_nvae_model_changes_only_the_nvae_fingerprints(tmp_path):
    root = _project(tmp_path)
    stage1 = {name: code_hash([STAGE1, f"hvae.stages.families.{name}"], root) for name in ("vqvae2", "nvae", "vae")}
    priors = code_hash(["hvae.stages.priors", "hvae.stages.families.vqvae2"], root)
    _edit(root / "models" / "nvae.py", "LOG_2PI = math.log(2 * math.pi)", "LOG_2PI = math.log(2.0 * math.pi)")
    assert code_hash([STAGE1, "hvae.stages.families.nvae"], root) != stage1["nvae"]
    assert code_hash([STAGE1, "hvae.stages.families.vae"], root) != stage1["vae"]  # the VAE is the NVAE code
    assert code_hash([STAGE1, "hvae.stages.families.vqvae2"], root) == stage1["vqvae2"]
    assert code_hash(["hvae.stages.priors", "hvae.stages.families.vqvae2"], root) == priors
    # and the other way round: the quantizer is VQ code only
    _edit(root / "models" / "quantize.py", "def perplexity(", "def perplexity(  ")
    assert code_hash([STAGE1, "hvae.stages.families.vqvae2"], root) != stage1["vqvae2"]
    assert code_hash([STAGE1, "hvae.stages.families.nvae"], root) != stage1["nvae"]  # (from the first edit)


def test_a_new_helper_a_stage_imports_inside_a_function_is_part_of_its_code(tmp_path):
    root = _project(tmp_path)
    before = code_hash(["hvae.stages.evaluate", "hvae.stages.families.nvae"], root)
    (root / "stages" / "helper.py").write_text("SCALE = 1.0\n")
    assert code_hash(["hvae.stages.evaluate", "hvae.stages.families.nvae"], root) == before  # not imported yet
    _edit(root / "stages" / "families" / "nvae.py", "    def scorer(self, model, upstream, ecfg):\n",
          "    def scorer(self, model, upstream, ecfg):\n        from ..helper import SCALE  # noqa\n")
    assert "stages/helper.py" in source_files(["hvae.stages.families.nvae"], root)
    after = code_hash(["hvae.stages.evaluate", "hvae.stages.families.nvae"], root)
    _edit(root / "stages" / "helper.py", "1.0", "2.0")
    assert len({before, after, code_hash(["hvae.stages.evaluate", "hvae.stages.families.nvae"], root)}) == 3


def test_the_pipeline_package_and_other_families_are_not_followed():
    files = source_files([STAGE1, "hvae.stages.families.vqvae2"])
    assert not any(f.startswith("pipeline/") for f in files)
    assert "stages/families/nvae.py" not in files and "models/nvae.py" not in files
    assert {"models/vqvae2.py", "models/quantize.py", "stages/train_loop.py", "stages/checkpoints.py"} <= set(files)


def test_what_files_import_is_kept_on_disk_and_an_edit_is_parsed_again(tmp_path, monkeypatch):
    """A new process finds what each file imports in the cache file (nothing parsed); an edited
    file (other bytes) is parsed again; a cache file that is no JSON is parsed over and rewritten."""
    import ast
    import json

    import hvae.pipeline.fingerprint as fingerprint

    root = _project(tmp_path / "code")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_CACHE", fingerprint._ImportCache())
    files = source_files([STAGE1, "hvae.stages.families.vqvae2"], root)
    entries = json.loads(fingerprint.cache_file().read_text())
    assert any(key.startswith("hvae.stages.stage1:") for key in entries)

    def refused(*args, **kwargs):
        raise AssertionError("parsed: the cache was not read")

    monkeypatch.setattr(fingerprint, "_CACHE", fingerprint._ImportCache())  # (a new process)
    monkeypatch.setattr(ast, "parse", refused)
    assert source_files([STAGE1, "hvae.stages.families.vqvae2"], root) == files
    monkeypatch.undo()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_CACHE", fingerprint._ImportCache())
    (root / "stages" / "helper.py").write_text("SCALE = 1.0\n")
    _edit(root / "stages" / "stage1.py", "from __future__ import annotations\n",
          "from __future__ import annotations\nfrom .helper import SCALE  # noqa\n")
    assert "stages/helper.py" in source_files([STAGE1, "hvae.stages.families.vqvae2"], root)

    fingerprint.cache_file().write_text("not json")
    monkeypatch.setattr(fingerprint, "_CACHE", fingerprint._ImportCache())
    assert "stages/helper.py" in source_files([STAGE1, "hvae.stages.families.vqvae2"], root)
    assert isinstance(json.loads(fingerprint.cache_file().read_text()), dict)
