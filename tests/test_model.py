import pytest
import torch
import torch.nn.functional as F

from samovar.config import get_preset
from samovar.kv_cache import KVCache, SlotCache
from samovar.layers import RMSNorm, Rotary, RouterStats, apply_rotary, load_balancing_loss
from samovar.loss import head_cross_entropy
from samovar.model import Transformer

VARIANTS = {
    "gpt2": get_preset("gpt2-tiny"),
    "gpt1-post-norm": get_preset("gpt1-tiny"),
    "llama-gqa": get_preset("llama-tiny"),
    "mqa-relu": get_preset("llama-tiny").replace(n_kv_head=1, mlp="relu", norm="layernorm"),
    "sliding-window": get_preset("llama-tiny").replace(sliding_window=5),
    "qk-norm-geglu": get_preset("llama-tiny").replace(qk_norm=True, mlp="geglu", gelu_approx="tanh",
                                                      norm_unit_offset=True, embed_scale=True, head_dim=24),
    "relu2-untied": get_preset("gpt2-tiny").replace(mlp="relu2", tie_embeddings=False, position="none"),
    "mixtral-moe": get_preset("mixtral-tiny"),
    "deepseek-mla-moe": get_preset("deepseek-v3-tiny"),
    "gemma": get_preset("gemma-tiny"),
    "qwen3": get_preset("qwen3-tiny"),
    "llama3-rope-scaling": get_preset("llama-tiny").replace(rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_context_len": 16}),
    "yarn": get_preset("llama-tiny").replace(rope_scaling={"type": "yarn", "factor": 4.0, "original_context_len": 16}),
}


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_forward_shapes_and_loss(name):
    cfg = VARIANTS[name]
    model = make(cfg)
    idx = torch.randint(cfg.vocab_size, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, cfg.vocab_size)
    targets = torch.randint(cfg.vocab_size, (2, 12))
    stats = RouterStats()
    loss = model(idx, targets, router_stats=stats)
    expected = F.cross_entropy(logits.view(-1, cfg.vocab_size), targets.view(-1))
    if cfg.n_expert:
        expected = expected + cfg.aux_loss_coef * load_balancing_loss(stats.router_logits, cfg.n_expert_active)
    assert torch.allclose(loss, expected, atol=1e-5)
    # a fresh model predicts roughly uniformly
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 1.0


@pytest.mark.parametrize("slots", [False, True], ids=["cache", "slot-cache"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decoding_equals_full_recompute(name, slots):
    cfg = VARIANTS[name]
    model = make(cfg)
    idx = torch.randint(cfg.vocab_size, (2, 20))
    full = model(idx)
    if slots:
        cache = SlotCache(cfg, slots=3, max_len=cfg.context_len)

        def run(part):
            return model(part, kv_cache=cache.rows(1, 3, part.size(1)))  # rows 1 and 2 of the three
    else:
        cache = KVCache(cfg, batch_size=2, max_len=cfg.context_len)

        def run(part):
            return model(part, kv_cache=cache)
    parts = [run(idx[:, :7])]  # prefill
    parts += [run(idx[:, t:t + 1]) for t in range(7, 15)]  # one token at a time
    parts.append(run(idx[:, 15:]))  # a chunk after history
    assert (cache.lengths[1:].tolist() == [[20], [20]]) if slots else cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_attention_is_causal(name):
    cfg = VARIANTS[name]
    model = make(cfg)
    idx = torch.randint(cfg.vocab_size, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(idx)[:, 10:], model(changed)[:, 10:])


def test_sliding_window_forgets_old_tokens():
    cfg = get_preset("llama-tiny").replace(n_layer=1, sliding_window=4)
    model = make(cfg)
    idx = torch.randint(cfg.vocab_size, (1, 12))
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % cfg.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, 6:], b[:, 6:])  # position 6 sees 3..6 only
    assert not torch.allclose(a[:, 2:6], b[:, 2:6])


def test_loss_mask_ignores_masked_positions():
    cfg = get_preset("gpt2-tiny")
    model = make(cfg)
    idx = torch.randint(cfg.vocab_size, (2, 10))
    targets = torch.randint(cfg.vocab_size, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 5:] = True
    logits = model(idx)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, cfg.vocab_size), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(model(idx, targets, loss_mask=mask), expected)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_cross_entropy_equals_cross_entropy_of_full_logits(softcap):
    """Chunked (a 9,000-token vocabulary: 128-row chunks, the last one partial), -100 skipped; the
    loss and both gradients equal F.cross_entropy's over the full logits."""
    torch.manual_seed(0)
    x = torch.randn(300, 32, requires_grad=True)
    head = torch.nn.Linear(32, 9000, bias=False)
    weight = torch.nn.init.normal_(head.weight, std=0.3)
    targets = torch.randint(9000, (300,))
    targets[::7] = -100

    def full_logits_loss(x, weight):
        logits = F.linear(x, weight)
        logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, targets)

    expected = full_logits_loss(x, weight)
    expected_grads = torch.autograd.grad(expected, (x, weight))
    loss = head_cross_entropy(x, head, targets, softcap)
    grads = torch.autograd.grad(loss * 3.0, (x, weight))  # the upstream gradient scales both
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, 3.0 * want)
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(x, head, targets, softcap), expected.detach())
    # all targets skipped (a batch without answer tokens): zero loss and zero gradients, not NaN
    none = head_cross_entropy(x, head, torch.full_like(targets, -100))
    assert none.item() == 0.0 and not torch.autograd.grad(none, x)[0].any()


def test_head_cross_entropy_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(200, 32, requires_grad=True)
    head = torch.nn.Linear(32, 9000, bias=False)
    weight = torch.nn.init.normal_(head.weight, std=0.3)
    targets = torch.randint(9000, (200,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(x, weight).float(), targets)
        loss = head_cross_entropy(x, head, targets)
    expected_grads = torch.autograd.grad(expected, (x, weight))
    grads = torch.autograd.grad(loss, (x, weight))
    assert abs(loss.item() - expected.item()) < 0.02
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_tied_and_untied_embeddings():
    tied = make(get_preset("gpt2-tiny"))
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = make(get_preset("llama-tiny"))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_too_long_input_is_refused():
    cfg = get_preset("gpt2-tiny")
    with pytest.raises(ValueError, match="exceeds context_len"):
        make(cfg)(torch.zeros(1, cfg.context_len + 1, dtype=torch.long))


def test_rmsnorm_matches_definition():
    x = torch.randn(3, 8)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    offset = RMSNorm(8, eps=1e-6, unit_offset=True)  # Gemma: (1 + w), w = 0 is the identity gain
    torch.testing.assert_close(offset(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_rotary_rotates_pairs_by_position_angles():
    D = 8
    rot = Rotary(D, max_len=16, theta=10000.0)
    x = torch.randn(1, 1, 1, D)
    cos, sin = rot(torch.tensor([5]))
    y = apply_rotary(x, cos, sin)
    # pair i is (x[i], x[i + D/2]) rotated by 5 * theta^(-2i/D); the norm of each pair is kept
    for i in range(D // 2):
        angle = 5 * 10000.0 ** (-2 * i / D)
        a, b = x[..., i].item(), x[..., i + D // 2].item()
        c, s = torch.cos(torch.tensor(angle)).item(), torch.sin(torch.tensor(angle)).item()
        assert y[..., i].item() == pytest.approx(a * c - b * s, abs=1e-5)
        assert y[..., i + D // 2].item() == pytest.approx(b * c + a * s, abs=1e-5)


def test_relative_positions_only_with_rope():
    """With RoPE, q.k depends on the distance of the positions, not on where they are."""
    rot = Rotary(8, max_len=32, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = []
    for start in (0, 9):
        cq, sq = rot(torch.tensor([start + 3]))
        ck, sk = rot(torch.tensor([start]))
        dots.append((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item())
    assert dots[0] == pytest.approx(dots[1], abs=1e-5)


def test_training_reduces_loss_on_a_fixed_batch():
    cfg = get_preset("llama-tiny")
    model = make(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(cfg.vocab_size, (4, 32))
    first = None
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5


def test_moe_routes_each_token_to_k_experts_and_balances():
    cfg = get_preset("mixtral-tiny")
    model = make(cfg).train()
    idx = torch.randint(cfg.vocab_size, (4, 16))
    stats = RouterStats()
    plain = model(idx, idx, router_stats=stats)  # with aux_loss_coef = 0.02
    assert len(stats.expert_load) == len(stats.router_logits) == cfg.n_layer
    for load in stats.expert_load:
        assert int(load.sum()) == 4 * 16 * cfg.n_expert_active
    aux = load_balancing_loss(stats.router_logits, cfg.n_expert_active)
    assert aux.item() >= 1.0 - 1e-4  # E * sum(f_e * p_e) is 1 when perfectly balanced, more otherwise
    without = make(cfg.replace(aux_loss_coef=0.0)).train()(idx, idx)
    torch.testing.assert_close(plain, without + 0.02 * aux)
    plain.backward()
    assert all(p.grad is not None for p in model.blocks[0].mlp.router.parameters())


def test_deepseek_router_uses_groups_and_bias():
    from samovar.layers import Router

    cfg = get_preset("deepseek-v3-tiny")  # 8 experts in 4 groups, the best 2 groups, top 2 experts
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0]))  # group 3 always wins
    x = torch.randn(50, cfg.n_embd)
    logits, weights, experts = router(x)
    assert ((experts == 6) | (experts == 7)).any(dim=1).all()
    chosen_groups = (experts // 2)
    assert all(len(set(row.tolist())) <= 2 for row in chosen_groups)
    scores = logits.sigmoid().gather(1, experts)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True) * cfg.routed_scale)


def test_logit_softcap_bounds_logits_and_zero_init_out_starts_at_identity_blocks():
    cfg = get_preset("llama-tiny").replace(logit_softcap=2.0, zero_init_out=True)
    model = make(cfg)
    idx = torch.randint(cfg.vocab_size, (1, 8))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits = model(idx)
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.5
    for block in model.blocks:  # the residual writes start at zero: every block is the identity
        assert block.attn.out_proj.weight.abs().max() == 0 and block.mlp.down_proj.weight.abs().max() == 0
    with pytest.raises(Exception, match="logit_softcap must be positive"):
        cfg.replace(logit_softcap=0.0)
