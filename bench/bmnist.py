"""A binarized-MNIST run, its test NLL in nats beside the published rows; writes
bench/results/bmnist_<model>.md.

    .venv/bin/python bench/bmnist.py configs/bmnist_vqvae2.yaml [key=value ...]
    .venv/bin/python bench/bmnist.py --from FOLDER configs/bmnist_nvae.yaml [key=value ...]

``--from FOLDER`` records the newest finished pipeline of the config's model family in FOLDER
instead of starting one (a run that was cut and finished by `hvae resume` there, or runs of
several families in one store, so that one `hvae report` shows them together): the same
config and overrides, the wall time then the stage runs' own added up.

Runs `hvae run CONFIG` in a fresh temporary folder on the full MNIST that set-up fetched
(data.root=<project>/data), then records the wall time, the epochs each training stage ran,
the test NLL with its estimator, and the evaluate stage's NLL table (ours among the
published rows of the lecture's tables, stages/literature.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import config_and_overrides, finished_run, fresh_run, metrics, record  # noqa: E402


def main(argv: list[str]) -> int:
    given = argv[argv.index("--from") + 1] if "--from" in argv else None
    if given:
        at = argv.index("--from")
        argv = argv[:at] + argv[at + 2:]
    config, overrides = config_and_overrides(argv)
    overrides = [f"data.root={ROOT / 'data'}", f"sample.classifier={ROOT / 'data' / 'mnist_classifier.pt'}", *overrides]
    if given:
        from hvae.settings.config import load_config
        from hvae.stages.families import of

        family = of(load_config(config, overrides)).name
    with (finished_run(given, family) if given else fresh_run(config, overrides)) as (folder, total, client, children):
        ev = children["evaluate"]
        m, tags = metrics(ev), ev.data.tags
        drawn = metrics(children["sample"])
        table = (Path(client.download_artifacts(ev.info.run_id, "report/nll_table.md", str(folder)))).read_text()
        trained = {s: r for s, r in children.items() if s in ("stage1", "priors")}
        epochs = ", ".join(f"{s}: {r.data.params.get(s + '.epochs')} epoch{'' if r.data.params.get(s + '.epochs') == '1' else 's'}, "
                           f"{metrics(r).get(s + '_seconds', 0):.0f} s" for s, r in trained.items())
        k = int(m.get("test_iw_samples", 1))
        how = (f"the importance-weighted estimate, K = {k}" if k > 1 else
               "the VQ upper bound −log p(x|z_q(x)) − Σ log p(z)" if "test_prior_nats" in m else "the negative ELBO")
    cmd = " ".join(["python bench/bmnist.py", *(["--from FOLDER"] if given else []), os.path.relpath(config, ROOT),
                    *argv[1:]])
    reused = sorted(s for s, r in children.items()
                    if r.data.tags.get("hvae.pipeline_run") != ev.data.tags.get("hvae.pipeline_run"))
    resumed = ((" Recorded with `--from` from the store it ran in: the wall time adds up its stage runs' own"
                + (f" ({', '.join(reused)} done by an earlier pipeline that was cut, reused by the `hvae resume` "
                   "that finished it)" if reused else "") + ".") if given else "")
    family = tags.get("hvae.model", "model")
    record(f"bmnist_{family}", cmd, "\n".join([
        f"Whole `hvae run`: **{total / 60:.0f} min** ({epochs}). Test NLL on the 10,000 binarized test "
        f"digits: **{tags.get('hvae.bound', '')} {m['test_nll_nats']:.2f} nats per image** "
        f"({m['test_nll_bpd']:.4f} bits/dim over 784 pixels) ± {m['test_nll_nats_se']:.2f} (the standard error over "
        f"the test digits), {how}; one seed.{resumed}"
        + (f" Of it, the reconstruction {m['test_recon_nats']:.2f} nats and the priors {m['test_prior_nats']:.2f}: "
           "a one-hot posterior pays every code's full cost." if "test_prior_nats" in m else ""),
        f"Its {int(drawn['num_samples'])} samples, scored by the MNIST classifier (bench/classifier.py): mean "
        f"confidence {drawn['sample_confidence']:.3f}, label entropy {drawn['sample_label_entropy']:.3f} nats "
        f"(ln 10 = 2.303: every digit as often), {drawn['sample_digits_seen'] * 10:.0f} of 10 digits drawn.", "",
        "The evaluate stage's table (ours among the published rows):", "", table,
    ]))
    if given:  # every family's row of the store, beside the published ones: `hvae report`
        import subprocess

        shown = subprocess.run([sys.executable, "-m", "hvae", "report", "--dataset", "mnist", "--out",
                                str(Path(given) / "report.md")], cwd=given, capture_output=True, text=True, timeout=600)
        record("bmnist_report", "hvae report --dataset mnist", "\n".join([
            "In the folder where the binarized-MNIST runs above ran (`bench/bmnist.py --from FOLDER`): "
            "`hvae report` puts each model's newest evaluate run beside the published rows.", "",
            shown.stdout.split("written to ")[0].strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
