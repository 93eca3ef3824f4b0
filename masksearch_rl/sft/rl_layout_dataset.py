"""SFT on the exact token layout of an RL rollout: verl's ``MultiTurnSFTDataset`` rows, tokenised the way our agent
loop (envs/agent_loop.py) builds a trajectory.

Why: ``MultiTurnSFTDataset`` renders every message with the chat template, so an ``<information>`` block becomes its
own ``<|im_start|>tool … <|im_end|>`` turn and the policy resumes after a fresh ``<|im_start|>assistant`` header. In RL
(MaskSearch / Search-R1 style) there is one assistant turn: the environment's block continues the policy's text as
raw tokens and the policy goes on right after ``</information>``. A large model bridges the two layouts; a small one
trained on the chat layout does not know what to write after a raw block (seen on the quickstart's tiny model). This
dataset trains on what RL will show the policy, token for token:

    chat_template(system, user, add_generation_prompt=True)        loss 0  (RLHFDataset's prompt)
    assistant text  "<think> … </think>\\n<search> q </search>"    loss 1
    information_block(body)  "\\n\\n<information>\\n…\\n</information>\\n\\n"   loss 0  (tokenizer.encode, as the loop)
    assistant text  "<think> … </think>\\n<answer> … </answer>"    loss 1
    eos                                                            loss 1

Rows are the parquet ``masksearch-rl sft export|oracle`` write (chat ``messages``; ``tool`` turns hold the
information blocks), so the same files serve both layouts: pick this one with
``data.custom_cls.path=pkg://masksearch_rl.sft.rl_layout_dataset data.custom_cls.name=RLLayoutSFTDataset``.
Padding and truncation follow the config as in verl's dataset (``pad_mode`` right / no_padding, ``truncation``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

from envs.prompts import INFO_CLOSE, INFO_OPEN, information_block

PROMPT_ROLES = ("system", "user")
INFO_ROLES = ("tool", "information", "observation")


def rl_layout_pieces(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, bool]]]:
    """Split a trajectory into the prompt messages and the response pieces ``(text, trained)`` in RL order.

    Raises ``ValueError`` naming the offending turn when the messages are not prompt turns followed by assistant
    and information turns (starting and ending with the assistant).
    """
    start = 0
    while start < len(messages) and messages[start].get("role") in PROMPT_ROLES:
        start += 1
    prompt, turns = messages[:start], messages[start:]
    if not prompt or not turns:
        raise ValueError("a trajectory needs prompt turns (system/user) followed by assistant turns")
    pieces: list[tuple[str, bool]] = []
    for position, message in enumerate(turns, start=start):
        role, content = message.get("role"), str(message.get("content") or "")
        if role == "assistant":
            pieces.append((content.strip(), True))
        elif role in INFO_ROLES:
            body = content.strip()
            if body.startswith(INFO_OPEN) and body.endswith(INFO_CLOSE):
                body = body[len(INFO_OPEN) : -len(INFO_CLOSE)]
            pieces.append((information_block(body), False))
        else:
            raise ValueError(f"turn {position}: role {role!r} cannot follow the prompt (assistant or {INFO_ROLES})")
    if turns[0].get("role") != "assistant" or turns[-1].get("role") != "assistant":
        raise ValueError("the response must start and end with an assistant turn")
    return prompt, pieces


class RLLayoutSFTDataset(MultiTurnSFTDataset):
    """verl's multi-turn SFT dataset with the RL rollout's single-assistant-turn token layout (see module doc)."""

    def tokenize(self, messages: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``loss_mask`` (1 = policy token) of one trajectory, before padding/truncation."""
        prompt, pieces = rl_layout_pieces(messages)
        prompt_ids = self.tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **self.apply_chat_template_kwargs
        )["input_ids"]
        ids, mask = list(prompt_ids), [0] * len(prompt_ids)
        for text, trained in pieces:
            piece = self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            mask += [int(trained)] * len(piece)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
            mask.append(1)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        try:
            input_ids, loss_mask = self.tokenize(self.messages[item])
        except ValueError as err:
            raise ValueError(f"{self.parquet_files}: row {item}: {err}") from err
        length = input_ids.shape[0]
        if length > self.max_length:
            if self.truncation == "error":
                raise ValueError(f"{self.parquet_files}: row {item}: {length} tokens > max_length {self.max_length}")
            keep = slice(-self.max_length, None) if self.truncation == "left" else slice(None, self.max_length)
            input_ids, loss_mask = input_ids[keep], loss_mask[keep]
            length = self.max_length
        position_ids = torch.arange(length, dtype=torch.long)
        if self.pad_mode == "no_padding":
            return {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask}
        pad = self.max_length - length
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return {
            "input_ids": F.pad(input_ids, (0, pad), value=pad_id),
            "attention_mask": F.pad(torch.ones(length, dtype=torch.long), (0, pad), value=0),
            "position_ids": F.pad(position_ids, (0, pad), value=0),
            "loss_mask": F.pad(loss_mask, (0, pad), value=0),
        }


class RLLayoutPretrainDataset(RLLayoutSFTDataset):
    """Language-model pre-training on whole trajectories in the RL layout: every token is a target.

    Why (the learning lab's copy pre-training): a trajectory's ``<information>`` block repeats the passage the prompt
    shows with its masks filled in, so predicting it is copy practice on almost every token -- far more than the few
    answer tokens SFT trains on. Select with ``data.custom_cls.name=RLLayoutPretrainDataset``.
    """

    def tokenize(self, messages: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, loss_mask = super().tokenize(messages)
        return input_ids, torch.ones_like(loss_mask)
