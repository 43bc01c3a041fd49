"""Stage 3: the KV-cache decoder and the pooled-memory path."""

import torch

from msa_cli.memory.encoder import encode
from msa_cli.memory.router import Router, RouterSpec
from msa_cli.model.decode import Decoder, KVCache, Memory
from tiny import tiny_backbone


def test_cached_decoding_gives_the_full_forwards_logits():
    backbone = tiny_backbone("qwen2")
    ids = torch.randint(0, 101, (12,))
    decoder, cache = Decoder(backbone), KVCache.empty(backbone.cfg.n_layers)
    decoder.forward(ids[:9], torch.arange(9), cache)
    for t in range(9, 12):
        logits = decoder.forward(ids[t:t + 1], torch.tensor([t]), cache)
        torch.testing.assert_close(logits, backbone.logits(ids[:t + 1])[-1], atol=1e-4, rtol=1e-4)


def test_generate_is_greedy_and_stops():
    backbone = tiny_backbone("llama")
    prompt = [3, 14, 15, 92]
    out = Decoder(backbone).generate(prompt, cache=KVCache.empty(4), start_position=0, max_new_tokens=5,
                                     stop_ids=[])
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(backbone.logits(torch.tensor(seq))[-1].argmax()))
    assert out == seq[len(prompt):]
    stop = Decoder(backbone).generate(prompt, cache=KVCache.empty(4), start_position=0, max_new_tokens=5,
                                      stop_ids=[out[2]])
    assert stop == out[:out.index(out[2])]


def test_memory_with_pooling_1_equals_plain_attention_over_the_documents_kv():
    """DESIGN.md invariant: with k >= #documents and pooling 1, router-layer attention over the memory is
    plain attention over those documents' K/V (here: the same K/V placed in the cache as a prefix)."""
    backbone = tiny_backbone("qwen3")
    layers = list(range(backbone.cfg.n_layers))
    router = Router(RouterSpec(heads=((0, 0),), group=3, granularity=1))
    docs = [torch.randint(0, 101, (n,)).tolist() for n in (7, 11)]
    enc = encode(backbone, docs, layers, router, pooling=1, out_dtype=torch.float32)
    template = {i: (torch.randn(3, 2, 16), torch.randn(3, 2, 16)) for i in layers}
    query = torch.randint(0, 101, (5,))
    positions = torch.arange(5) + 3 + len(docs)

    with_memory = Decoder(backbone).forward(query, positions, KVCache.from_prefix(template, 4, torch.float32),
                                            Memory(enc.content))
    prefix = {i: (torch.cat([template[i][0], enc.content[i][0]]), torch.cat([template[i][1], enc.content[i][1]]))
              for i in layers}
    plain = Decoder(backbone).forward(query, positions, KVCache.from_prefix(prefix, 4, torch.float32))
    torch.testing.assert_close(with_memory, plain, atol=1e-4, rtol=1e-4)


def test_memory_only_changes_the_content_layers():
    backbone = tiny_backbone("llama")
    query, positions = torch.randint(0, 101, (4,)), torch.arange(4)
    no_memory = Decoder(backbone).forward(query, positions, KVCache.empty(4))
    empty = Memory({2: (torch.zeros(0, 2, 16), torch.zeros(0, 2, 16))})
    torch.testing.assert_close(Decoder(backbone).forward(query, positions, KVCache.empty(4), empty), no_memory)
    some = Memory({2: (torch.randn(3, 2, 16), torch.randn(3, 2, 16))})
    assert not torch.allclose(Decoder(backbone).forward(query, positions, KVCache.empty(4), some), no_memory)


def test_no_repeat_ngram_keeps_greedy_decoding_out_of_loops():
    backbone = tiny_backbone("llama")
    prompt = [3, 14, 15, 92]
    plain = Decoder(backbone).generate(prompt, cache=KVCache.empty(4), start_position=0, max_new_tokens=60,
                                       stop_ids=[])
    grams = lambda seq, n: [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    assert len(set(grams(plain, 3))) < len(grams(plain, 3))   # the tiny random model loops
    out = Decoder(backbone).generate(prompt, cache=KVCache.empty(4), start_position=0, max_new_tokens=60,
                                     stop_ids=[], no_repeat_ngram=3)
    assert len(out) == 60 and len(set(grams(out, 3))) == len(grams(out, 3))
    first = next(i for i, g in enumerate(grams(plain, 3)) if g in grams(plain, 3)[:i])
    assert out[:first + 2] == plain[:first + 2]   # greedy until the first repeat
