"""Stage 1 invariants (DESIGN.md): packing does not change a document's encoding; chunks map back to
exactly one document; pooled K is the chunk mean of the keys a lone forward computes."""

import torch

from msa_cli.memory.encoder import encode
from msa_cli.memory.router import Router, RouterSpec
from msa_cli.model.backbone import causal_attention
from msa_cli.model.packing import packs
from tiny import tiny_backbone

LAYERS = [2, 3]


def make(pooling=8, granularity=4):
    backbone = tiny_backbone("qwen3")
    router = Router(RouterSpec(heads=((1, 0), (2, 4)), group=3, granularity=granularity))
    return backbone, router, pooling


def docs_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (n,), generator=g).tolist() for n in lengths]


def rows(counts, i):
    start = sum(counts[:i])
    return slice(start, start + counts[i])


def test_packing_and_order_do_not_change_a_documents_encoding():
    backbone, router, pooling = make()
    docs = docs_of([13, 8, 21, 1])
    packed = encode(backbone, docs, LAYERS, router, pooling, torch.float32, pack_tokens=64)
    reordered = encode(backbone, docs[::-1], LAYERS, router, pooling, torch.float32, pack_tokens=64)
    for i, doc in enumerate(docs):
        alone = encode(backbone, [doc], LAYERS, router, pooling, torch.float32)
        j = len(docs) - 1 - i
        for layer in LAYERS:
            for t in range(2):  # K and V
                torch.testing.assert_close(packed.content[layer][t][rows(packed.chunk_counts, i)],
                                           alone.content[layer][t], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(reordered.content[layer][t][rows(reordered.chunk_counts, j)],
                                           alone.content[layer][t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.route_keys[rows(packed.key_counts, i)], alone.route_keys,
                                   atol=1e-5, rtol=1e-5)


def test_every_chunk_and_key_belongs_to_exactly_one_document():
    backbone, router, pooling = make(pooling=8, granularity=4)
    lengths = [13, 8, 21, 1, 64]
    enc = encode(backbone, docs_of(lengths), LAYERS, router, pooling, torch.float32, pack_tokens=40)
    assert enc.chunk_counts == [2, 1, 3, 1, 8]                  # ceil(L / 8): the last chunk may be partial
    assert enc.key_counts == [3, 2, 5, 0, 16]                   # ceil((L - 1) / 4): the first token is a sink
    assert enc.content[2][0].shape[0] == sum(enc.chunk_counts)
    assert enc.route_keys.shape == (sum(enc.key_counts), 2, 16)
    torch.testing.assert_close(enc.route_keys.norm(dim=-1), torch.ones(sum(enc.key_counts), 2))


def test_pooled_k_and_v_are_chunk_means_of_a_lone_forward_with_positions_from_zero():
    backbone, router, pooling = make(pooling=8)
    doc = docs_of([19])[0]
    enc = encode(backbone, [doc], LAYERS, router, pooling, torch.float32)
    ids, positions = torch.tensor(doc), torch.arange(len(doc))
    h = backbone.embed_tokens(ids)
    for i in range(max(LAYERS) + 1):
        q, k, v = backbone.qkv(i, backbone.attn_input(i, h))
        q, k = backbone.rope(q, positions), backbone.rope(k, positions)
        if i in LAYERS:
            for chunk, (start, end) in enumerate([(0, 8), (8, 16), (16, 19)]):
                torch.testing.assert_close(enc.content[i][0][chunk], k[start:end].mean(0), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(enc.content[i][1][chunk], v[start:end].mean(0), atol=1e-5, rtol=1e-5)
        h = backbone.finish_layer(i, h, causal_attention(q, k, v))


def test_packs_hold_at_most_the_budget_and_keep_order():
    assert packs([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
