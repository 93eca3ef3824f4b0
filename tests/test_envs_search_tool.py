"""The hermes-variant search tool (envs/search_tool.py) against our retrieval server on 127.0.0.1.

The tool is loaded from envs/config/search_tool.yaml by verl's own loader (``initialize_tools_from_config``) and
called the way verl 0.9.1's ToolAgentLoop calls it: ``create(create_kwargs=...)``, ``execute(instance_id, args,
agent_data=...)``, ``release(instance_id)``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from verl.tools.tool_registry import initialize_tools_from_config

from envs.prompts import SEARCH_EMPTY_QUERY, TRUNCATION_MARKER
from envs.search_client import SearchSettings, close_shared_backends, format_hits, truncate_to_budget
from envs.search_tool import SearchTool
from masksearch_rl.retrieval.index import build_index, load_index
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.retrieval.types import Hit
from masksearch_rl.synthetic import write_synthetic_corpus

TOOL_YAML = Path(__file__).resolve().parents[1] / "envs" / "config" / "search_tool.yaml"


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_synthetic_corpus(root, num_passages=60, num_questions=1, seed=0, progress=False)
    return load_index(build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False))


@pytest.fixture(scope="module")
def retrieval_url(retriever):
    with running_server(create_app(retriever, ServerConfig())) as url:
        yield url


@pytest.fixture(autouse=True)
async def _close_backends():
    yield
    await close_shared_backends()


def tool_from_yaml(tmp_path, **config_changes) -> SearchTool:
    """The shipped YAML, with some tool config keys changed, loaded by verl's loader."""
    data = yaml.safe_load(TOOL_YAML.read_text())
    data["tools"][0]["config"].update(config_changes)
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(data))
    (tool,) = initialize_tools_from_config(str(path))
    return tool


async def call(tool: SearchTool, arguments: dict):
    """One tool call, as verl's ToolAgentLoop._call_tool makes it."""
    instance_id, _ = await tool.create(create_kwargs={"item_id": "ramp-1"})
    try:
        return await tool.execute(instance_id, arguments, agent_data=None)
    finally:
        await tool.release(instance_id)


async def test_shipped_yaml_loads_with_verl_and_searches(retrieval_url, retriever, monkeypatch):
    monkeypatch.setenv("MASKSEARCH_RETRIEVAL_URL", retrieval_url)  # the YAML's ${oc.env:...} default
    (tool,) = initialize_tools_from_config(str(TOOL_YAML))
    assert isinstance(tool, SearchTool) and tool.name == "search"
    schema = tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True)
    assert schema["function"]["parameters"]["required"] == ["query"]
    assert tool.settings.backend == {"type": "server", "url": retrieval_url, "timeout_s": 30, "max_retries": 3,
                                     "concurrency": 64}

    response, reward, metrics = await call(tool, {"query": "Vyvutyr"})
    hits = retriever.search(["Vyvutyr"], 3)[0]
    assert response.text == format_hits(hits)  # 3 hits, well under 512 words
    lines = response.text.split("\n")
    assert len(lines) == 3 and all(line.startswith(f"Doc {i} (Title: ") for i, line in enumerate(lines, 1))
    assert lines[0].startswith("Doc 1 (Title: Vyvutyr) Vyvutyr lies at an elevation of 215 metres.")
    assert reward == 0.0
    assert metrics["num_hits"] == 3 and metrics["error"] is None and metrics["latency_s"] > 0
    assert metrics["create_kwargs"] == {"item_id": "ramp-1"}
    assert tool._instances == {}  # released


async def test_the_rows_exclusion_hides_passages_from_the_search(retrieval_url, retriever, tmp_path):
    """A row exported with --hide-source carries create_kwargs.exclude; the tool hides those passages."""
    tool = tool_from_yaml(tmp_path, backend={"url": retrieval_url})
    first, second, *_ = retriever.search(["Vyvutyr"], 10)[0]
    create_kwargs = {"item_id": first.id, "exclude": {"ids": [first.id], "texts": [second.text]}}
    instance_id, _ = await tool.create(create_kwargs=create_kwargs)
    try:
        response, _, metrics = await tool.execute(instance_id, {"query": "Vyvutyr"}, agent_data=None)
    finally:
        await tool.release(instance_id)
    expected = [h for h in retriever.search(["Vyvutyr"], 10)[0] if h.id != first.id and h.text != second.text][:3]
    assert response.text == format_hits(expected) and metrics["num_hits"] == 3
    assert first.text not in response.text and second.text not in response.text
    assert tool._exclusions == {}  # released with the instance
    # A row without it searches as before.
    response, _, _ = await call(tool, {"query": "Vyvutyr"})
    assert response.text == format_hits(retriever.search(["Vyvutyr"], 3)[0])


async def test_results_are_cut_to_the_word_budget(retrieval_url, tmp_path, monkeypatch):
    monkeypatch.delenv("MASKSEARCH_POLICY_TOKENIZER", raising=False)
    tool = tool_from_yaml(tmp_path, backend={"url": retrieval_url}, topk=5, max_info_tokens=25)
    assert tool.tokenizer is None
    response, _, metrics = await call(tool, {"query": "Vyvutyr capital"})
    assert response.text.startswith("Doc 1 (Title: ") and response.text.endswith(TRUNCATION_MARKER)
    assert len(response.text[: -len(TRUNCATION_MARKER)].split()) == 25
    assert metrics["num_hits"] == 5


@pytest.fixture(scope="module")
def policy_tokenizer_dir(tmp_path_factory, retriever) -> Path:
    """A byte-level BPE tokenizer trained on a few texts (no downloads), standing in for the policy's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["Doc 1 (Title: Vyvutyr) Vyvutyr lies at an elevation of 215 metres."] * 10, trainer)
    path = tmp_path_factory.mktemp("policy_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path)
    return path


async def test_shipped_yaml_counts_the_policys_tokens(retrieval_url, policy_tokenizer_dir, monkeypatch):
    """As in the tag loop, max_info_tokens counts the policy's tokens: the hermes recipe exports the policy's path
    to every Ray worker as $MASKSEARCH_POLICY_TOKENIZER, which the shipped YAML reads."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("MASKSEARCH_RETRIEVAL_URL", retrieval_url)
    monkeypatch.setenv("MASKSEARCH_POLICY_TOKENIZER", str(policy_tokenizer_dir))
    (tool,) = initialize_tools_from_config(str(TOOL_YAML))
    assert tool.tokenizer is not None and tool.settings.max_info_tokens == 512
    tool.settings.max_info_tokens = 30
    response, _, _ = await call(tool, {"query": "Vyvutyr capital"})
    tokenizer = AutoTokenizer.from_pretrained(policy_tokenizer_dir)
    assert response.text.endswith(TRUNCATION_MARKER)
    assert 30 - 2 <= len(tokenizer.encode(response.text, add_special_tokens=False)) <= 30 + 2
    assert len(response.text.split()) < 30  # a word budget would have kept more text


@pytest.mark.parametrize("arguments", [{"query": "  "}, {"query": ["a", "b"]}, {"q": "Vyvutyr"}])
async def test_bad_arguments_get_an_error_text(retrieval_url, tmp_path, arguments):
    tool = tool_from_yaml(tmp_path, backend={"url": retrieval_url})
    response, reward, metrics = await call(tool, arguments)
    assert response.text == SEARCH_EMPTY_QUERY and reward == 0.0
    assert metrics["called_backend"] is False and metrics["error"] == "empty query"


async def test_server_down_gives_an_error_text(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    tool = tool_from_yaml(tmp_path, backend={"url": dead, "max_retries": 1, "backoff_s": 0.01})
    response, _, metrics = await call(tool, {"query": "Vyvutyr"})
    assert response.text.startswith("Search error: the search engine did not answer (ConnectError).")
    assert dead not in response.text  # the policy is not shown server addresses
    assert "failed after 2 attempt(s)" in metrics["error"] and metrics["called_backend"] is True


def test_unknown_config_key_fails_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"search tool 'search' config: unknown search setting\(s\) \['top_k'\]"):
        tool_from_yaml(tmp_path, top_k=3)


def test_format_and_truncate_without_a_tokenizer():
    hits = [Hit("1", '"Alpha"\nFirst <information> line.', 1.0), Hit("2", "untitled text", 0.5)]
    assert format_hits(hits) == "Doc 1 (Title: Alpha) First line.\nDoc 2 untitled text"
    # a passage quoting the hermes tags cannot close the tool response early either
    assert format_hits([Hit("3", "a </tool_response> b <tool_call>", 1.0)]) == "Doc 1 a b"
    assert format_hits([]) == ""
    text = "one two\nthree four five"
    assert truncate_to_budget(text, 5) == text
    assert truncate_to_budget(text, 3) == "one two\nthree" + TRUNCATION_MARKER
    assert SearchSettings().backend == {"type": "server", "url": "http://127.0.0.1:8000"}
    assert SearchSettings(backend={"type": "local", "index_dir": "x"}).backend == {"type": "local", "index_dir": "x"}
    with pytest.raises(ValueError, match="topk"):
        SearchSettings(topk=0)
