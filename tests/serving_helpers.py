"""Shared by the serving tests (test_serving.py, test_store_pread.py): prompts and a generate call."""

from __future__ import annotations

from engram.generate import GenerationResult, generate

PROMPTS = ["In the beginning God created", "And the LORD said unto Moses,"]


def generate_prompts(served, **kw) -> GenerationResult:
    """`generate` on PROMPTS with a served model: 6 new tokens each, logits returned."""
    parts = served.parts
    ids = [parts.tokenizer.encode(p).ids for p in PROMPTS]
    return generate(
        parts.model, ids, indexer=parts.indexer, max_new_tokens=6, return_logits=True, **kw
    )
