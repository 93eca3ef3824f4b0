"""verl tool ``search`` for the hermes ``<tool_call>`` variant, run by verl's built-in ``tool_agent`` loop.

Declared in ``envs/config/search_tool.yaml`` and loaded by verl's ``initialize_tools_from_config`` once per agent
loop worker (``actor_rollout_ref.rollout.multi_turn.tool_config_path``). It searches through
:mod:`envs.search_client`, so results, formatting, budgets and error texts are the same as in the tag loop.

verl 0.9.1 calls, per tool call: ``create(create_kwargs=row's tools_kwargs.search.create_kwargs)``, then
``execute(instance_id, parsed_json_arguments, agent_data=...)``, then ``release(instance_id)``. A bad or empty
query, or a backend failure, comes back as text in the tool response, never as an exception. ``create_kwargs``
may carry ``exclude`` (``ramp export --hide-source``): those passages are hidden from the search, as in the tag
loop (:func:`envs.search_client.row_exclusion`).

Tool ``config`` keys (besides verl's ``type: native``): the fields of
:class:`~envs.search_client.SearchSettings` and ``tokenizer_path``: the policy's tokenizer (a local path or hub id),
with which ``max_info_tokens`` counts tokens, as the tag loop counts them. verl gives tools no tokenizer, so the
shipped YAML reads it from ``$MASKSEARCH_POLICY_TOKENIZER``, which the hermes recipe sets for every Ray worker to
``actor_rollout_ref.model.path``; without one the budget counts words (logged once), roughly 1.3 tokens each.

verl then cuts each tool response to ``actor_rollout_ref.rollout.multi_turn.max_tool_response_length``
*characters* (256 by default, with a "...(truncated)..." in the middle): set it above what ``max_info_tokens``
produces (about 4096 for 512 tokens), so the cut that counts is ours.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from envs.search_client import SearchSettings, row_exclusion, search_once, shared_backend
from masksearch_rl.retrieval.exclusion import SearchExclusion

logger = logging.getLogger(__name__)

VERL_KEYS = ("type",)  # keys verl's loader reads from the tool config itself

# Used when the YAML gives no tool_schema; the YAML's copy is what the model sees in its prompt.
DEFAULT_SCHEMA = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the knowledge source and return the most relevant passages for a query.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to search for, in a few words."}},
            "required": ["query"],
        },
    },
}


class SearchTool(BaseTool):
    """Searches the configured backend for ``{"query": "..."}`` and returns the formatted hits."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None):
        super().__init__(config, tool_schema)
        options = {k: v for k, v in dict(config or {}).items() if k not in VERL_KEYS}
        tokenizer_path = options.pop("tokenizer_path", None)
        try:
            self.settings = SearchSettings.from_mapping(options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"search tool {self.name!r} config: {err}") from err
        self.backend = shared_backend(self.settings.backend)
        self.tokenizer = None
        if tokenizer_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        else:
            logger.warning(
                "search tool %r has no tokenizer_path (or $MASKSEARCH_POLICY_TOKENIZER): max_info_tokens=%d counts "
                "words, not the policy's tokens", self.name, self.settings.max_info_tokens,
            )
        self._instances: dict[str, dict[str, Any]] = {}  # instance id -> the row's create_kwargs
        self._exclusions: dict[str, SearchExclusion | None] = {}  # instance id -> what the row hides

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        """The configured schema, or :data:`DEFAULT_SCHEMA` when the YAML has none (verl asks during __init__)."""
        return getattr(self, "tool_schema", None) or OpenAIFunctionToolSchema.model_validate(DEFAULT_SCHEMA)

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        """One instance per tool call; the row's ``create_kwargs`` (e.g. ``item_id``) are echoed in the metrics,
        their ``exclude`` is applied to the search."""
        instance_id = instance_id or uuid4().hex
        create_kwargs = dict(kwargs.get("create_kwargs") or {})
        self._exclusions[instance_id] = row_exclusion(create_kwargs)
        self._instances[instance_id] = create_kwargs
        return instance_id, ToolResponse()

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict]:
        """Search ``parameters["query"]``: (formatted hits or an error text, step reward 0.0, metrics).

        verl 0.9.1's ToolAgentLoop drops the metrics dict; it is returned for other callers and tests.
        """
        query = parameters.get("query") if isinstance(parameters, dict) else None
        outcome = await search_once(query, self.settings, self.backend, self.tokenizer,
                                    exclusion=self._exclusions.get(instance_id))
        metrics = {
            "create_kwargs": self._instances.get(instance_id, {}),
            "query": query if isinstance(query, str) else None,
            "num_hits": outcome.num_hits,
            "latency_s": round(outcome.latency_s, 6),
            "called_backend": outcome.called_backend,
            "error": outcome.error,
        }
        return ToolResponse(text=outcome.text), 0.0, metrics

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instances.pop(instance_id, None)
        self._exclusions.pop(instance_id, None)
