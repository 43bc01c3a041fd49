"""A checkpoint in the released MSA-4B's layout (config model_type "msa", router_{q,k}_proj in the router layers,
Qwen's special tokens), tiny and random, written by the test: it loads, stage 1 writes what the model reads,
its routing scores equal the formulas of digest §1.4 computed directly, and the generative-retrieval protocol
(digest §4) runs as a deterministic state machine."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import msa, msa_env
from msa_cli.corpus.splitter import Passage
from msa_cli.engine import Engine, reindex
from msa_cli.errors import ModelUnavailable, MsaError
from msa_cli.memory.mode import mode_for
from msa_cli.model.loading import load_model
from msa_cli.model.msa_checkpoint import read_config
from msa_cli.qa import generative
from msa_cli.qa.ask import Options, ask
from tiny import save_tiny_msa_checkpoint

FACTS = ["The capital of Freedonia is Fredville, a city on the river Fred.",
         "Erik Watts is the son of Bill Watts, a wrestling promoter from Oklahoma.",
         "Bill Watts was born on May 5, 1939, in Oklahoma City, and later promoted wrestling.",
         "The quokka is a small wallaby found on Rottnest Island near Perth in Western Australia.",
         "The axolotl is a salamander that keeps its gills all its life and lives in lakes near Mexico City."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_msa_checkpoint(tmp_path_factory.mktemp("msa-ckpt") / "tiny-msa")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(str(checkpoint), dtype=torch.float32)


def filled_engine(model, path, facts=FACTS) -> Engine:
    engine = Engine.open(model, path, create=True)
    passages = [Passage(path=f"/notes/{i}.txt", text=t, page=None, line_start=1, line_end=1,
                        n_tokens=len(model.tokenizer(t).input_ids)) for i, t in enumerate(facts)]
    with engine.bank.lock():
        engine.commit([(p, "hash") for p in passages], engine.encode(passages))
    return engine


def hf_model(checkpoint):
    """The same backbone run by transformers: the reference our forward is compared with."""
    from safetensors.torch import load_file

    config, _ = read_config(checkpoint)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: v for k, v in load_file(checkpoint / "model.safetensors").items() if "router_" not in k}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


# --- loading ------------------------------------------------------------------------------------------------

def test_loads_the_msa_layout_and_its_backbone_computes_what_transformers_does(checkpoint, model):
    assert model.identity["family"] == "msa"
    assert model.msa.router_layers == (2, 3) and model.msa.top_k == 2 and model.msa.pooling == 4
    q, k = model.msa.router_proj[2]
    assert q.shape == (6, 16, 96) and k.shape == (2, 16, 96)   # [Hq, d, D] and [Hk, d, D]
    assert model.tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids.__len__() == 3
    ids = torch.tensor(model.tokenizer("Bill Watts was born in 1939.").input_ids)
    with torch.no_grad():
        expected = hf_model(checkpoint)(ids[None]).logits[0]
    torch.testing.assert_close(model.backbone.logits(ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"head_reduce_method": "max"}, "head_reduce_method = 'max' is not supported"),
    ({"decouple_router": False}, "decouple_router is false"),
    ({"router_layer_idx": "2,9"}, "names no layers"),
])
def test_an_msa_config_it_does_not_implement_is_a_clear_error(tmp_path, change, message):
    directory = save_tiny_msa_checkpoint(tmp_path / "ckpt", msa_config=change)
    with pytest.raises(ModelUnavailable, match=message):
        load_model(str(directory))


def test_missing_router_weights_are_a_clear_error_with_exit_code_5(tmp_path):
    directory = save_tiny_msa_checkpoint(
        tmp_path / "ckpt", edit=lambda state, tok: state.pop("model.layers.3.self_attn.router_k_proj.0.weight"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a fact\n")
    r = msa(msa_env(tmp_path / "home"), "ingest", str(tmp_path / "docs"), "--model", str(directory), "--bank",
            str(tmp_path / "bank"))
    assert r.returncode == 5 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "router_k_proj.0.weight (router layer 3)" in r.stderr


# --- stage 1 ------------------------------------------------------------------------------------------------

def test_stage_one_wraps_each_document_in_its_id_and_pools_router_keys_as_the_content(checkpoint, model, tmp_path):
    engine = filled_engine(model, tmp_path / "bank")
    s = engine.bank.settings
    assert s["content_layers"] == [2, 3] and s["pooling"] == 4   # a checkpoint's bank keeps content by default
    with pytest.raises(MsaError, match="needs --content kv"):     # and cannot do without it
        Engine.open(model, tmp_path / "other", create=True, content=False)
    assert s["document_template"] == "<|im_start|>[{id}]. {text}[{id}]<|im_end|>"
    hf = hf_model(checkpoint)
    seg = engine.bank.routing_segments()[0]
    for doc in engine.bank.documents():
        text = f"<|im_start|>[{doc.doc_id}]. {doc.text}[{doc.doc_id}]<|im_end|>"
        ids = model.tokenizer(text, add_special_tokens=False).input_ids
        n_chunks = math.ceil(len(ids) / 4)
        assert doc.chunk_count == doc.key_count == n_chunks   # router keys pool the content's chunks
        with torch.no_grad():   # alone, positions from 0: document-wise RoPE
            hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
        keys = seg.keys[doc.key_start:doc.key_start + doc.key_count].float()   # [C, layers * Hk, d]
        for j, layer in enumerate((2, 3)):
            x = hf.model.layers[layer].input_layernorm(hidden[layer][0])
            rk = (x @ model.msa.router_proj[layer][1].flatten(0, 1).T).view(len(ids), 2, 16)
            pooled = torch.stack([rk[4 * c:4 * c + 4].mean(0) for c in range(n_chunks)])   # token 0 included
            # dot-product routing (as released) stores the raw means, in the bank's bf16
            torch.testing.assert_close(keys[:, 2 * j:2 * j + 2], pooled.bfloat16().float(), atol=2e-2, rtol=2e-2)


# --- stage 2: routing scores --------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_each_router_layer_selects_its_top_k_by_the_formula(checkpoint, model, tmp_path, score):
    """Digest §1.4: score[t,h,c] = <QR[t,h], K̄R[h//G, c]> / sqrt(d) (released) or the cosine (paper); mean over
    heads, max over the routing tokens, max over a document's chunks; top-k per layer."""
    path = tmp_path / "bank"
    engine = filled_engine(model, path)
    if score == "cosine":
        reindex(model, path, mode_for(model).named_router("cosine"))
        engine = Engine.open(model, path)
    question = "When was Erik Watts' father born?"
    tok = model.tokenizer
    routed = tok(generative.INSTRUCTION + question + generative.RETURN_DOCUMENTS, add_special_tokens=False).input_ids
    rest = tok(generative.TEMPLATE_TAIL + generative.RESPONSE_HEAD, add_special_tokens=False).input_ids
    current = generative.Round(engine, [generative.Piece(routed, True), generative.Piece(rest, False)])
    current.write(1)

    # The first router layer's input does not depend on memory: transformers computes it directly, with the
    # template head at positions 0..2 and the query from 3 + k.
    head = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
    ids = head + routed + rest
    positions = list(range(3)) + list(range(3 + 2, 3 + 2 + len(routed) + len(rest)))
    hf = hf_model(checkpoint)
    with torch.no_grad():
        hidden = hf(torch.tensor([ids]), position_ids=torch.tensor([positions]), output_hidden_states=True).hidden_states
    x = hf.model.layers[2].input_layernorm(hidden[2][0])[3:3 + len(routed)]       # the routing tokens
    qr = (x @ model.msa.router_proj[2][0].flatten(0, 1).T).view(len(routed), 6, 16)   # [T, Hq, d]
    seg = engine.bank.routing_segments()[0]
    kr = seg.keys[:, 0:2].float()                                                  # layer 2's [C, Hk, d]
    if score == "cosine":
        qr = F.normalize(qr, dim=-1)
        chunk = torch.einsum("thd,chd->tch", qr, kr.repeat_interleave(3, dim=1)).mean(-1)
    else:
        chunk = torch.einsum("thd,chd->tch", qr, kr.repeat_interleave(3, dim=1)).mean(-1) / 16 ** 0.5
    chunk = chunk.max(0).values                                                   # max over routing tokens
    doc = torch.full((len(FACTS),), float("-inf")).scatter_reduce(0, seg.key_doc.long(), chunk, "amax")
    best = torch.topk(doc, 2)
    assert current.memory.selected[2] == best.indices.tolist()
    torch.testing.assert_close(torch.tensor(current.memory.scores[2]), best.values, atol=1e-4, rtol=1e-4)
    assert set(current.memory.selected) == {2, 3} and all(len(v) == 2 for v in current.memory.selected.values())


@pytest.mark.parametrize("method, score", [("INFONCE_DECOUPLE", "dot"), ("INFONCE", "cosine")])
def test_the_default_routing_score_is_the_one_the_reference_infers_with(tmp_path, method, score):
    directory = save_tiny_msa_checkpoint(tmp_path / "ckpt", msa_config={"aux_loss_method": method})
    assert mode_for(load_model(str(directory))).default_router().score == score


def test_a_layer_never_selects_more_documents_than_the_bank_holds(model, tmp_path):
    engine = filled_engine(model, tmp_path / "bank", FACTS[:1])   # top_k 2, one document (digest §7 B8)
    current = generative.Round(engine, [generative.Piece(model.tokenizer("hello").input_ids, True)])
    current.write(1)
    assert current.memory.selected == {2: [0], 3: [0]}


# --- the protocol -------------------------------------------------------------------------------------------

class ScriptedRound:
    """Stands in for the model in a round: replies from a script, and records what each round was given."""
    script: list[str] = []
    seen: list[dict] = []

    def __init__(self, engine, pieces):
        self.tok = engine.model.tokenizer
        self.memory = generative.RoutedMemory(engine, torch.zeros(0, dtype=torch.bool), 2)
        self.memory.selected = {2: [1, 2], 3: [2, 0]}
        self.memory.scores = {2: [0.9, 0.5], 3: [0.8, 0.1]}
        ScriptedRound.seen.append({"text": self.tok.decode([t for p in pieces for t in p.ids]),
                                   "routing": self.tok.decode([t for p in pieces if p.routes for t in p.ids]),
                                   "routes": [p.routes for p in pieces for _ in p.ids], "fed": []})

    def write(self, max_new_tokens, feed=(), stop_when=None, on_token=None):
        if feed:
            ScriptedRound.seen[-1]["fed"].append(self.tok.decode(list(feed)))
        reply = self.tok(ScriptedRound.script.pop(0), add_special_tokens=False).input_ids
        for t in reply:
            if on_token:
                on_token(t)
        return reply


def run_script(monkeypatch, engine, script, hops=3):
    monkeypatch.setattr(generative, "Round", ScriptedRound)
    ScriptedRound.script, ScriptedRound.seen = list(script), []
    shown = []
    answer = ask(engine, "When was Erik Watts' father born?", Options(hops=hops, max_tokens=20),
                 lambda t: shown.append(t))
    return answer, ScriptedRound.seen, engine.model.tokenizer.decode(shown)


QUESTION = "\nPlease answer the question based on the above historical document information\n\n" \
           "When was Erik Watts' father born?\nPlease return all documents related to the question\n"
ROUTED_LATER = QUESTION[:-1]   # rounds 2+: the user content up to "...related to the question", not its "\n"


def test_protocol_injects_named_documents_reroutes_on_the_latest_and_answers_after_end_of_retrieve(
        model, tmp_path, monkeypatch):
    engine = filled_engine(model, tmp_path / "bank")
    a, seen, shown = run_script(monkeypatch, engine, [
        "[1][42]<|object_ref_end|>",             # 42 is no document: dropped
        "[2]<|object_ref_end|>",
        "<End-of-Retrieve>",
        "The answer to the question is: May 5, 1939"])
    assert a.text == "May 5, 1939" and shown.strip() == "May 5, 1939" and not a.abstained
    assert [s["path"] for s in a.sources()] == ["/notes/1.txt", "/notes/2.txt"]
    assert [s["hop"] for s in a.sources()] == [1, 2]
    assert [h.selected for h in a.retrieval.hops] == [[1], [2], []]
    assert a.retrieval.hops[0].layers == {2: [1, 2], 3: [2, 0]}
    assert [s["score"] for s in a.sources()] == [0.5, 1.0]   # the share of router layers that selected each

    block1 = f"[1]. {FACTS[1]}\n<|object_ref_end|>"
    block2 = f"[2]. {FACTS[2]}\n<|object_ref_end|>"
    assert seen[0]["text"] == QUESTION + "<|im_end|>\n<|im_start|>"
    assert seen[0]["routing"] == QUESTION   # round 1: the whole user content
    # Round 2 re-prefills the whole transcript; the question and only the block just injected route, without
    # the "\n" after the question nor the block's <|object_ref_end|> (msa_service._apply_template_regenerate).
    assert seen[1]["text"] == seen[0]["text"] + "[1][42]<|object_ref_end|>" + block1
    assert seen[1]["routing"] == ROUTED_LATER + f"[1]. {FACTS[1]}\n"
    assert seen[2]["text"] == seen[1]["text"] + "[2]<|object_ref_end|>" + block2
    assert seen[2]["routing"] == ROUTED_LATER + f"[2]. {FACTS[2]}\n"
    # After <End-of-Retrieve> the question is restated in the same round, then the model answers.
    assert seen[2]["fed"] == ["<|im_start|>The user's question is: When was Erik Watts' father born?\n"
                              "<|object_ref_end|>"]
    assert len(seen) == 3


def test_protocol_stops_retrieving_at_the_round_cap_and_restates_the_question(model, tmp_path, monkeypatch):
    engine = filled_engine(model, tmp_path / "bank")
    a, seen, _ = run_script(monkeypatch, engine, [
        "[0]<|object_ref_end|>", "[3]<|object_ref_end|>", "The answer to the question is: Perth"], hops=2)
    assert a.text == "Perth" and [s["doc_id"] for s in a.sources()] == [0, 3]
    assert len(seen) == 3   # two retrieval rounds, then one prefill to answer in
    assert seen[2]["text"].endswith(f"[3]. {FACTS[3]}\n<|object_ref_end|><|im_start|>The user's question is: "
                                    "When was Erik Watts' father born?\n<|object_ref_end|>")
    assert seen[2]["routing"] == ROUTED_LATER + f"[3]. {FACTS[3]}\n"


def test_protocol_takes_a_direct_answer(model, tmp_path, monkeypatch):
    engine = filled_engine(model, tmp_path / "bank")
    a, seen, shown = run_script(monkeypatch, engine, ["Fredville"])
    assert a.text == "Fredville" and shown == "Fredville" and a.sources() == [] and len(seen) == 1


def test_naming_only_documents_read_or_unknown_injects_them_as_the_reference_does_and_routes_again(
        model, tmp_path, monkeypatch):
    """Digest §4.2: the block holds every named document in memory, read before or not; for unknown ids it is a
    bare <|object_ref_end|>; either way the next round routes again (no restatement the model never wrote)."""
    engine = filled_engine(model, tmp_path / "bank")
    a, seen, _ = run_script(monkeypatch, engine, [
        "[4]<|object_ref_end|>", "[4]<|object_ref_end|>", "[42]<|object_ref_end|>", "<End-of-Retrieve>",
        "The answer to the question is: salamander"], hops=4)
    assert a.text == "salamander" and [s["doc_id"] for s in a.sources()] == [4]
    assert [h.selected for h in a.retrieval.hops] == [[4], [], [], []]   # what each round added
    block4 = f"[4]. {FACTS[4]}\n<|object_ref_end|>"
    assert len(seen) == 4
    assert seen[2]["text"] == seen[1]["text"] + "[4]<|object_ref_end|>" + block4   # read again
    assert seen[2]["routing"] == ROUTED_LATER + f"[4]. {FACTS[4]}\n"
    assert seen[3]["text"] == seen[2]["text"] + "[42]<|object_ref_end|>" + "<|object_ref_end|>"   # empty block
    assert seen[3]["routing"] == ROUTED_LATER + f"[4]. {FACTS[4]}\n"   # the last block with text still routes
    assert seen[3]["fed"] == ["<|im_start|>The user's question is: When was Erik Watts' father born?\n"
                              "<|object_ref_end|>"]


def reference_routes(tok, transcript: str) -> list[bool]:
    """Which tokens of a later round's transcript route in the reference, computed as it does
    (msa_service._apply_template_regenerate, digest §4.2): the whole transcript tokenized at once; routing are the
    tokens up to and including "Please return all documents related to the question", and those of the text from
    the "[" after the last "]<|object_ref_end|>[" up to the next "<|object_ref_end|>"."""
    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    routes = [False] * n_tokens(transcript)
    marker = "]<|object_ref_end|>["
    start = transcript.rfind(marker)
    if start != -1:
        start += len(marker) - 1
        end = transcript.find("<|object_ref_end|>", start)
        first = n_tokens(transcript[:start])
        for i in range(first, min(first + n_tokens(transcript[start:end]), len(routes))):
            routes[i] = True
    anchor = "Please return all documents related to the question"
    for i in range(n_tokens(transcript[:transcript.find(anchor) + len(anchor)])):
        routes[i] = True
    return routes


def test_every_round_routes_exactly_the_tokens_the_reference_routes(model, tmp_path, monkeypatch):
    engine = filled_engine(model, tmp_path / "bank")
    tok = model.tokenizer
    _, seen, _ = run_script(monkeypatch, engine, [
        "[1][42]<|object_ref_end|>",   # a block that routes
        "[9]<|object_ref_end|>",       # unknown: an empty block; the one before goes on routing
        "[2] <|object_ref_end|>",      # no "]" before <|object_ref_end|>: the reference does not find this block
        "[3]<|object_ref_end|>",
        "<End-of-Retrieve>", "The answer to the question is: 1939"], hops=5)
    assert len(seen) == 5
    n_question = len(tok(QUESTION, add_special_tokens=False).input_ids)
    assert seen[0]["routes"] == [True] * n_question + [False] * 3   # round 1: the whole user content
    for r in seen[1:]:
        assert len(tok(r["text"], add_special_tokens=False).input_ids) == len(r["routes"])   # pieces = the text
        assert r["routes"] == reference_routes(tok, r["text"])
    assert [r["routing"][len(ROUTED_LATER):] for r in seen[1:]] == [
        f"[1]. {FACTS[1]}\n", f"[1]. {FACTS[1]}\n", f"[1]. {FACTS[1]}\n", f"[3]. {FACTS[3]}\n"]


# --- end to end on a real (tiny) checkpoint -----------------------------------------------------------------

def bigram(script: dict[str, str]):
    """Weights that make the checkpoint write a fixed next token after each scripted token, whatever the context:
    attention and MLP outputs are zero, so the last hidden state is the token's own embedding."""
    def edit(state, tok):
        for name in list(state):
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                state[name].zero_()
        embed = state["model.embed_tokens.weight"]
        normed = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + 1e-6) * state["model.norm.weight"]
        head = torch.zeros_like(embed)
        for now, then in script.items():
            a, b = tok.convert_tokens_to_ids(now), tok.convert_tokens_to_ids(then)
            head[b] += 10 * normed[a]
        state["lm_head.weight"] = head
    return edit


def test_generative_retrieval_runs_end_to_end_on_the_checkpoint_and_is_deterministic(tmp_path):
    directory = save_tiny_msa_checkpoint(tmp_path / "ckpt", tie=False, edit=bigram({
        "<|im_start|>": "[", "[": "1", "1": "]", "]": "<|object_ref_end|>",
        "<|object_ref_end|>": "<End-of-Retrieve>", "<End-of-Retrieve>": "<|im_end|>"}))
    model = load_model(str(directory), dtype=torch.float32)
    engine = filled_engine(model, tmp_path / "bank")
    runs = [ask(engine, "Who is Erik Watts' father?", Options(max_tokens=8)).to_json(engine) for _ in range(2)]
    assert runs[0]["hops"] == runs[1]["hops"] and runs[0]["answer"] == runs[1]["answer"]
    out = runs[0]
    assert [s["doc_id"] for s in out["sources"]] == [1] and out["sources"][0]["path"] == "/notes/1.txt"
    assert [h["selected"] for h in out["hops"]] == [[1], []]
    for hop in out["hops"]:   # each router layer picked its own top-2
        assert sorted(hop["layers"]) == [2, 3]
        assert all(len(ids) == 2 for ids in hop["layers"].values())
    assert out["hops"][1]["routing_text"].endswith(f"[1]. {FACTS[1]}\n")
    assert out["answer"] == "<End-of-Retrieve>"   # after the restatement it writes its one scripted reply


def test_a_retrieval_round_ends_past_1000_characters_not_at_a_token_count(tmp_path):
    """The reference ends a round once its reply passes 1000 characters, each token decoded on its own (digest
    §4.2, msa/generate.py max_ret_len). "user" is one 4-character token here: 251 of them pass 1000 characters.
    Then the question is restated and the model answers."""
    directory = save_tiny_msa_checkpoint(tmp_path / "ckpt", tie=False, edit=bigram({
        "<|im_start|>": "user", "user": "user", "<|object_ref_end|>": "!", "!": "<|im_end|>"}))
    model = load_model(str(directory), dtype=torch.float32)
    engine = filled_engine(model, tmp_path / "bank", FACTS[:2])
    a = ask(engine, "Who is Erik Watts' father?", Options(max_tokens=8, hops=3))
    assert len(a.retrieval.hops) == 1 and a.text == "!"   # one round, then the restatement and its answer
    assert a.tokens == 251 + 1


def test_cli_ingests_and_answers_with_an_msa_checkpoint(checkpoint, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, fact in enumerate(FACTS):
        (docs / f"{i}.txt").write_text(fact + "\n")
    env, bank = msa_env(tmp_path / "home", checkpoint), ("--bank", str(tmp_path / "bank"))
    r = msa(env, "ingest", str(docs), *bank)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    # one summary line: transformers' warning about a model type it does not know is not shown
    assert r.stderr.startswith("ingested 5 files") and r.stderr.count("\n") == 1, r.stderr
    r = msa(env, "ask", "Where is Fredville?", "--json", "--max-tokens", "4", "--hops", "2", *bank)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["router"]["kind"] == "msa" and out["router"]["score"] == "dot"
    assert len(out["hops"]) <= 2 and all(len(h["layers"]) == 2 for h in out["hops"])
    r = msa(env, "search", "Fredville", "--json", *bank)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == len(FACTS)


def one_round(engine, question="When was Erik Watts' father born?"):
    tok = engine.model.tokenizer
    current = generative.Round(engine, [
        generative.Piece(tok(generative.INSTRUCTION + question + generative.RETURN_DOCUMENTS,
                             add_special_tokens=False).input_ids, True),
        generative.Piece(tok(generative.TEMPLATE_TAIL + generative.RESPONSE_HEAD, add_special_tokens=False).input_ids,
                         False)])
    out = current.write(6)
    return out, current.memory.selected, current.memory.scores


def test_the_triton_kernels_route_and_attend_as_the_torch_references_do(model, tmp_path, monkeypatch):
    engine = filled_engine(model, tmp_path / "bank")
    expected = one_round(engine)
    monkeypatch.setenv("MSA_KERNELS", "triton")   # Triton's interpreter here; compiled kernels on a GPU
    got = one_round(engine)
    assert got[0] == expected[0] and got[1] == expected[1]
    for layer in expected[2]:
        torch.testing.assert_close(torch.tensor(got[2][layer]), torch.tensor(expected[2][layer]), atol=1e-4, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(checkpoint, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a fact\n")
    r = msa(msa_env(tmp_path / "home"), "ingest", str(tmp_path / "docs"), "--model", str(checkpoint), "--bank",
            str(tmp_path / "bank"), "--device", "cuda")
    assert r.returncode == 5
    assert r.stderr.strip() == "msa: error: --device cuda: this machine has no CUDA GPU that torch can use"
    assert not (tmp_path / "bank").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_checkpoint_routes_and_writes_as_on_the_cpu(checkpoint, model, tmp_path):
    cpu = filled_engine(model, tmp_path / "bank")
    gpu_model = load_model(str(checkpoint), dtype=torch.float32, device="cuda")
    gpu = Engine.open(gpu_model, tmp_path / "bank")   # the same bank: routing keys go to the GPU, content stays
    expected, got = one_round(cpu), one_round(gpu)
    assert got[1] == expected[1] and got[0] == expected[0]
    assert gpu.router._keys_on_device and all(k.is_cuda for k in gpu.router._keys_on_device.values())
