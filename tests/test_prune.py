"""prune.py: the four pruning modes zero what they say, and the model is restored exactly."""

import math

import pytest
import torch
import torch.nn as nn

import abmll
import prune
from llama import ModelArgs, Transformer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_name("tiny")).eval()


def _tokens():
    return torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    assert all(not layer._forward_hooks for layer in model.layers)


@pytest.mark.parametrize("p,k", [(1, 1), (10, 6), (20, 13), (30, 19)])  # round(p% of dim=64), half up
def test_activation_pruning_zeroes_smallest(model, p, k):
    x, snap = _tokens(), _snapshot(model)
    with torch.no_grad():
        ref = model(x)
    raw, cut = [], []
    for layer in model.layers:  # registered before pruned(): sees the block's own output
        layer.register_forward_hook(lambda m, a, o: raw.append(o.clone()))
    with prune.pruned(model, p), torch.no_grad():
        for layer in model.layers:  # registered after: sees what the next block receives
            layer.register_forward_hook(lambda m, a, o: cut.append(o.clone()))
        out = model(x)
    assert len(raw) == len(cut) == len(model.layers)
    for r, c in zip(raw, cut):
        zero = c == 0
        assert (zero.sum(-1) == k).all()
        assert torch.equal(c[~zero], r[~zero])  # the rest untouched
        a = r.abs()
        assert (a.masked_fill(~zero, -1).amax(-1) <= a.masked_fill(zero, math.inf).amin(-1)).all()
    assert not torch.allclose(out, ref)
    assert all(len(layer._forward_hooks) == 2 for layer in model.layers)  # pruned()'s own hook is gone
    for layer in model.layers:
        layer._forward_hooks.clear()
    _assert_same(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("mode", ["activation", "weight"])
def test_zero_percent_is_a_noop(model, mode):
    x, snap = _tokens(), _snapshot(model)
    with torch.no_grad():
        ref = model(x)
        with prune.pruned(model, 0, mode):
            assert all(not layer._forward_hooks for layer in model.layers)
            assert torch.equal(model(x), ref)
    _assert_same(model, snap)


def test_weight_pruning_and_restore(model):
    x, snap = _tokens(), _snapshot(model)
    with torch.no_grad():
        ref = model(x)
        with prune.pruned(model, 20, "weight"):
            linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
            assert len(linears) == 7 * len(model.layers)
            for m in linears:
                w, w0 = m.weight.flatten(), None
                n = int(0.2 * w.numel() + 0.5)
                assert (w == 0).sum() == n
                name = next(k for k, v in model.named_parameters() if v is m.weight)
                w0 = snap[name].flatten().abs()
                assert w0[w == 0].max() <= w0[w != 0].min()  # the smallest |w| went
            assert torch.equal(model.tok_embeddings.weight, snap["tok_embeddings.weight"])
            assert not torch.allclose(model(x), ref)
        _assert_same(model, snap)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("method", ["lora", "abmll"])
def test_weight_pruning_merges_adapters_and_restores_exactly(model, method):
    abmll.inject(model, method)
    g = torch.Generator().manual_seed(2)
    mean_path = {"lora": ("lora_B", "lora_A"), "abmll": ("phi_mean_B", "phi_mean_A")}[method]
    adapters = [m for m in model.modules() if hasattr(m, mean_path[0])]
    for m in adapters:  # B = 0 at init would make merging a no-op: give the adapters a mean
        getattr(m, mean_path[0]).data.normal_(0, 0.5, generator=g)
    merged = {m: m.weight + m.scaling * getattr(m, mean_path[0]) @ getattr(m, mean_path[1]) for m in adapters}
    x, snap = _tokens(), _snapshot(model)
    torch.manual_seed(3)  # abmll draws its weight noise from the global generator
    with torch.no_grad():
        ref = model(x)
        with prune.pruned(model, 30, "weight"):
            for m in adapters:
                w, want = m.weight.flatten(), merged[m].flatten()
                zero = w == 0
                assert zero.sum() == int(0.3 * w.numel() + 0.5)
                assert torch.equal(w[~zero], want[~zero])  # W0 + s B A, pruned
                assert want.abs()[zero].max() <= want.abs()[~zero].min()
                assert (getattr(m, mean_path[0]) == 0).all()
                xs = torch.randn(3, w.numel() // m.weight.shape[0], generator=g)
                if method == "lora":  # the module computes x (pruned merged weight)^T and nothing else
                    assert torch.equal(m(xs), xs @ m.weight.T)
            torch.manual_seed(3)
            assert not torch.allclose(model(x), ref)
        _assert_same(model, snap)
        torch.manual_seed(3)
        assert torch.equal(model(x), ref)


def test_pruning_restores_after_an_error(model):
    snap = _snapshot(model)
    for mode in ("activation", "weight"):
        with pytest.raises(RuntimeError, match="boom"), prune.pruned(model, 10, mode):
            raise RuntimeError("boom")
        _assert_same(model, snap)
    with pytest.raises(ValueError, match="mode"), prune.pruned(model, 10, "neurons"):
        pass


@pytest.mark.parametrize("method,p", [("lora", 10), ("abmll", 30)])
def test_adapted_pruning_zeroes_smallest_outputs_per_token(model, method, p):
    abmll.inject(model, method)
    kinds = (abmll.LoRALinear, abmll.BayesLoRALinear)
    adapted = [m for m in model.modules() if isinstance(m, kinds)]
    assert len(adapted) == 3 * len(model.layers)
    x, snap = _tokens(), _snapshot(model)
    raw, cut = [], []
    for m in adapted:  # before pruned(): the layer's own output; after: what the model goes on with
        m.register_forward_hook(lambda mod, a, o: raw.append(o.clone()))
    with prune.pruned(model, p, "adapted"), torch.no_grad():
        for m in adapted:
            m.register_forward_hook(lambda mod, a, o: cut.append(o.clone()))
        model(x)
    assert len(raw) == len(cut) == len(adapted)
    for r, c in zip(raw, cut):
        zero = c == 0
        assert (zero.sum(-1) == int(p * c.shape[-1] / 100 + 0.5)).all()  # wq 64, wv 32 wide
        assert torch.equal(c[~zero], r[~zero])
        a = r.abs()
        assert (a.masked_fill(~zero, -1).amax(-1) <= a.masked_fill(zero, math.inf).amin(-1)).all()
    assert all(len(m._forward_hooks) == 2 for m in adapted)  # pruned()'s own hook is gone
    for m in adapted:
        m._forward_hooks.clear()
    _assert_same(model, snap)


def test_pruning_mode_errors(model):
    with pytest.raises(ValueError, match="no adapted layers"), prune.pruned(model, 10, "adapted"):
        pass
    with pytest.raises(ValueError, match="calib"), prune.pruned(model, 10, "channel"):
        pass
    with pytest.raises(ValueError, match="activation, weight, adapted, channel"):
        with prune.pruned(model, 10, "x"):
            pass
    assert prune.PRUNE_MODES == ("activation", "weight", "adapted", "channel")


def _calib():
    """Two right-padded batches: a row's tokens after answer_pos + 1 are padding (id 0)."""
    g = torch.Generator().manual_seed(6)
    batches = []
    for pos in ([5, 2], [3, 6, 4]):
        tokens = torch.randint(1, 512, (len(pos), 9), generator=g)
        pos = torch.tensor(pos)
        tokens[torch.arange(9) > pos[:, None] + 1] = 0
        batches.append({"tokens": tokens, "answer_pos": pos})
    return batches


@pytest.mark.parametrize("p", [10, 30])
def test_channel_pruning_zeroes_the_quietest_channels(model, p):
    with torch.no_grad():  # loud padding: counted by mistake, it would change the ranking
        model.tok_embeddings.weight[0] *= 300
    calib, x, snap = _calib(), _tokens(), _snapshot(model)
    total = [torch.zeros(64, dtype=torch.float64) for _ in model.layers]
    count = [0] * len(model.layers)
    for batch in calib:  # the reference ranking: its own hooks, its own mask
        outs = []
        handles = [la.register_forward_hook(lambda m, a, o: outs.append(o)) for la in model.layers]
        with torch.no_grad():
            model(batch["tokens"], logits_at=batch["answer_pos"][:, None])
        for h in handles:
            h.remove()
        for i, o in enumerate(outs):
            # (T_b, dim) real tokens of row b; the last block ran at answer_pos only: (1, dim)
            rows = [o[b, :batch["answer_pos"][b] + 2] if o.shape[1] > 1 else o[b] for b in range(len(o))]
            total[i] += torch.cat(rows).abs().double().sum(0)
            count[i] += sum(len(r) for r in rows)
    k = int(p * 64 / 100 + 0.5)
    want = [set((t / c).argsort()[:k].tolist()) for t, c in zip(total, count)]
    cut = []
    with prune.pruned(model, p, "channel", calib), torch.no_grad():
        for layer in model.layers:
            layer.register_forward_hook(lambda m, a, o: cut.append(o.clone()))
        model(x)
    for c, w in zip(cut, want):
        dead = (c == 0).all(dim=(0, 1))  # (dim,): zero at every token
        assert set(dead.nonzero()[:, 0].tolist()) == w
    for layer in model.layers:
        layer._forward_hooks.clear()
    _assert_same(model, snap)
