#!/usr/bin/env bash
# Regenerates the committed sample traces (a few sessions x a few turns each, < 200 KB).
# Content comes from the local Python's stdlib sources, so another Python version writes
# different (but equally valid) text; the same Python writes byte-identical files.
set -euo pipefail
cd "$(dirname "$0")"
S=(--set skills=3 --set skill_tokens=150 --set memory_tokens=100 --set tool_tokens=400
   --set doc_tokens=250 --set tools=6 --set tool_desc_tokens=30)
irminsul traces generate --family header --sessions 2 --turns 3 "${S[@]}" -o header.jsonl
irminsul traces generate --family reorder --sessions 2 --turns 3 "${S[@]}" -o reorder.jsonl
irminsul traces generate --family toolloop --sessions 2 --turns 4 "${S[@]}" \
    --set context_budget=1200 -o toolloop.jsonl
irminsul traces generate --family subagent --sessions 1 --turns 3 "${S[@]}" \
    --set docs=2 --set subagent_turns=2 -o subagent.jsonl
irminsul traces generate --family rag --sessions 2 --turns 3 "${S[@]}" \
    --set docs=4 --set rag_corpus=6 -o rag.jsonl
irminsul traces generate --family mixed --sessions 3 --turns 3 --seed 2 --api mixed "${S[@]}" \
    --set docs=2 --set subagent_turns=2 -o mixed.jsonl
