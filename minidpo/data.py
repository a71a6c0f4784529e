"""Preference data: every source becomes the same validated {"prompt", "chosen", "rejected"} records.

The record format is TRL's "standard" preference format; TRL's "conversational" format (lists of
{"role", "content"} messages) is rendered to text with the tokenizer's chat template. Sources:

    name_or_path                              format   schema
    Anthropic/hh-rlhf                         hh       chosen, rejected: whole "\\n\\nHuman: ... \\n\\nAssistant: ..."
    openai/summarize_from_feedback            tldr     info.{post,title,subreddit}, summaries[i].text, choice
    CarperAI/openai_summarize_comparisons     generic  prompt, chosen, rejected
    stanfordnlp/SHP                           shp      history, human_ref_A, human_ref_B, labels, score_ratio
    a .jsonl / .json / .csv / .parquet file   any of the above (detected from the columns, or format=...)
    a local folder or any other hub name      any of the above

Hub names go through datasets.load_dataset(name); local files through
load_dataset("json" | "csv" | "parquet", data_files=path): the same code path either way.
"""

from __future__ import annotations

import json
import os
import random
import re

from .dpo import check_record, tokenize_pair

HUB_FORMATS = {
    "Anthropic/hh-rlhf": "hh",
    "openai/summarize_from_feedback": "tldr",
    "CarperAI/openai_summarize_comparisons": "generic",
    "stanfordnlp/SHP": "shp",
}
HUB_CONFIGS = {"openai/summarize_from_feedback": "comparisons"}
FORMATS = ("generic", "hh", "tldr", "shp")
ASSISTANT = "\n\nAssistant:"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# ---- the sources ---------------------------------------------------------------------------------

def split_hh(chosen_transcript, rejected_transcript):
    """Anthropic HH: (prompt, chosen, rejected) from two full transcripts. The prompt is everything up
    to and including the last "\\n\\nAssistant:" (all earlier turns are context); the responses are
    what follows, leading space kept. Both transcripts must share that prompt: ValueError otherwise."""
    parts = []
    for field, transcript in (("chosen", chosen_transcript), ("rejected", rejected_transcript)):
        if not isinstance(transcript, str):
            raise ValueError(f"{field!r} must be a string, got {type(transcript).__name__}")
        cut = transcript.rfind(ASSISTANT)
        if cut < 0:
            raise ValueError(f"{field!r} has no {ASSISTANT!r} turn: the whole transcript would be the prompt")
        cut += len(ASSISTANT)
        parts.append((transcript[:cut], transcript[cut:]))
    (prompt, chosen), (other_prompt, rejected) = parts
    if prompt != other_prompt:
        raise ValueError("'chosen' and 'rejected' transcripts diverge before the last Assistant turn")
    return prompt, chosen, rejected


def tldr_prompt(subreddit, title, post):
    """The paper's TL;DR prompt (the format of Stiennon et al. 2020)."""
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def _from_tldr(row):
    info, summaries, choice = row["info"], row["summaries"], row["choice"]
    if choice not in (0, 1) or len(summaries) != 2:
        raise ValueError(f"'choice' must be 0 or 1 over two summaries, got {choice!r}")
    post = info.get("post") or info.get("article")  # the CNN/DM rows of the validation split have 'article'
    prompt = tldr_prompt(info.get("subreddit") or "", info.get("title") or "", (post or "").strip())
    text = lambda i: " " + summaries[i]["text"].strip()  # noqa: E731  a space after "TL;DR:"
    return {"prompt": prompt, "chosen": text(choice), "rejected": text(1 - choice)}


def _from_shp(row):
    # labels == 1: human_ref_A was preferred (it has the higher score).
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    return {"prompt": f"\n\nHuman: {row['history']}{ASSISTANT}", "chosen": " " + chosen, "rejected": " " + rejected}


def _from_hh(row):
    prompt, chosen, rejected = split_hh(row["chosen"], row["rejected"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _is_messages(value):
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def render_conversational(row, tokenizer):
    """TRL's conversational format -> text with the tokenizer's chat template. The prompt is rendered
    with the generation prompt (e.g. "<|im_start|>assistant\\n"); each response is the rest of the
    rendered full conversation. A row with no 'prompt' (implicit prompt) takes the messages shared
    by chosen and rejected as its prompt."""
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational records need a tokenizer with a chat template")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = {"prompt": prompt_text}
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(f"the chat template does not extend the prompt for {field!r}")
        out[field] = full[len(prompt_text):]
    return out


def _from_generic(row, prompt_column, chosen_column, rejected_column, tokenizer):
    for column in (chosen_column, rejected_column):
        if row.get(column) is None:
            raise ValueError(f"missing field {column!r}")
    chosen, rejected = row[chosen_column], row[rejected_column]
    if _is_messages(chosen):
        conversation = {"chosen": chosen, "rejected": rejected}
        if row.get(prompt_column) is not None:
            conversation["prompt"] = row[prompt_column]
        return render_conversational(conversation, tokenizer)
    if row.get(prompt_column) is None:
        raise ValueError(f"missing field {prompt_column!r}")
    return {"prompt": row[prompt_column], "chosen": chosen, "rejected": rejected}


def detect_format(columns, first_row=None):
    """The format of a source from its columns (and, for chosen/rejected without a prompt, its first row:
    message lists are TRL's conversational format with an implicit prompt, strings are HH transcripts)."""
    columns = set(columns)
    if {"info", "summaries", "choice"} <= columns:
        return "tldr"
    if {"history", "human_ref_A", "human_ref_B", "labels"} <= columns:
        return "shp"
    if {"chosen", "rejected"} <= columns and "prompt" not in columns:
        return "generic" if first_row is not None and _is_messages(first_row.get("chosen")) else "hh"
    return "generic"


def read_jsonl(path, with_source=True):
    """The rows of a JSON-lines file (blank lines skipped; a bad line is an error naming it): the one reader of the
    package, for data, metrics and results alike. with_source: each dict row gets "_source": "<path>:<line>", the
    name every error about a record uses (underscored: a user's own "source" field stays as it is)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if with_source and isinstance(record, dict):
                    record["_source"] = f"{path}:{lineno}"
                records.append(record)
    return records


def split_records(records, eval_size, seed, batch_size=1):
    """(train, eval): a seeded shuffle, then the last eval_size records are held out. eval_size None:
    min(64, 10% of the records), at least 1 while batch_size training records remain, else 0."""
    n = len(records)
    if eval_size is None:
        eval_size = max(min(64, n // 10), 1) if n - 1 >= batch_size else 0
        eval_size = min(eval_size, max(n - batch_size, 0))
        print(f"held out {eval_size} of {n} records for evaluation (min(64, 10%) by default; set --eval_size)")
    elif n - eval_size < batch_size:
        raise ValueError(f"--eval_size {eval_size} leaves {max(n - eval_size, 0)} of {n} records for training, "
                         f"fewer than --batch_size {batch_size}: lower --eval_size or --batch_size")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:n - eval_size]], [records[i] for i in order[n - eval_size:]]


def seeded_sample(records, k, seed):
    """k records drawn without replacement by a seeded generator (all of them if fewer), e.g. evaluation
    prompts from a whole split (a hub split may be sorted, e.g. IMDb by label)."""
    records = list(records)
    return random.Random(seed).sample(records, min(k, len(records)))


def looks_like_hub_name(name):
    """'namespace/name' with no file extension: only such a string is tried on the hub."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and os.path.splitext(name)[1].lower() not in _FILE_BUILDERS


def column(raw, name):
    """One column of what _load_raw returns (a datasets.Dataset, or a list of dicts for a .jsonl file)."""
    return [row[name] for row in raw] if isinstance(raw, list) else raw[name]


def _load_raw(name_or_path, split, config_name=None, data_files=None, **load_kwargs):
    """datasets.load_dataset for a hub name, a local folder, or a local file (by its extension); a
    JSON-lines file through read_jsonl (a list of dicts), so that errors name its lines."""
    from datasets import load_dataset
    if data_files is None and not os.path.exists(name_or_path) and not looks_like_hub_name(name_or_path):
        raise FileNotFoundError(f"no such file: {name_or_path}")
    if data_files is not None or os.path.isfile(name_or_path):
        files = data_files if data_files is not None else name_or_path
        first = files if isinstance(files, str) else next(iter(files.values() if isinstance(files, dict) else files))
        ext = os.path.splitext(first)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise ValueError(f"{first}: unknown file type {ext!r}; expected one of {sorted(_FILE_BUILDERS)}")
        if data_files is None and split != "train":
            raise ValueError(f"{name_or_path} is one file, one split: there is no split {split!r} in it (for a "
                             f"held-out set use --eval_size, or a folder with train.jsonl and {split}.jsonl)")
        if ext == ".jsonl" and isinstance(files, str):
            rows = read_jsonl(files)
            bad = next((row for row in rows if not isinstance(row, dict)), None)
            if bad is not None:
                raise ValueError(f"{files}: every line must be a JSON object, got {type(bad).__name__}")
            return rows
        split = split if isinstance(files, dict) else "train"  # a dict names its splits; one file is "train"
        return load_dataset(_FILE_BUILDERS[ext], data_files=files, split=split, **load_kwargs)
    return load_dataset(name_or_path, config_name or HUB_CONFIGS.get(name_or_path), split=split, **load_kwargs)


def load_preferences(name_or_path, split="train", format=None, *, config_name=None, data_files=None,
                     prompt_column="prompt", chosen_column="chosen", rejected_column="rejected",
                     tokenizer=None, min_score_ratio=None, skip_invalid=False, with_source=False, **load_kwargs):
    """Any preference source -> a datasets.Dataset with string columns prompt, chosen, rejected.

    format: generic | hh | tldr | shp; by default known hub names map to theirs and files are
    detected from their columns. The *_column options rename a generic source's columns.
    tokenizer: needed for conversational (message-list) records, to apply its chat template.
    min_score_ratio: SHP only, keep pairs whose preferred score is at least this multiple of the
    other's (the SHP authors suggest 2). Every record is validated (validate_preferences): a bad one
    is an error naming it (file:line for a .jsonl file, else source[row]), unless skip_invalid, which drops
    and reports them. with_source: a "_source" column holds that name, for later errors about the record.
    """
    from datasets import Dataset
    raw = _load_raw(name_or_path, split, config_name=config_name, data_files=data_files, **load_kwargs)
    if format is None:
        columns = raw.column_names if hasattr(raw, "column_names") else {key for row in raw for key in row}
        format = HUB_FORMATS.get(name_or_path) or detect_format(columns, raw[0] if len(raw) else None)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if format == "shp" and min_score_ratio is not None:
        raw = [row for row in raw if row["score_ratio"] >= min_score_ratio]
    convert = {"hh": _from_hh, "tldr": _from_tldr, "shp": _from_shp}.get(format)

    if convert is None:
        convert = lambda row: _from_generic(row, prompt_column, chosen_column, rejected_column, tokenizer)  # noqa: E731

    records, errors = [], []
    for i, row in enumerate(raw):
        where = row.get("_source") or (f"{name_or_path}:{split}[{i}]" if looks_like_hub_name(name_or_path)
                                      else f"{name_or_path}[{i}]")
        try:
            record = convert(row)
            check_record(record)
            records.append({**record, "_source": where})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            errors.append((where, str(e)))
    report_bad_records(errors, len(raw), skip_invalid)
    columns = ("prompt", "chosen", "rejected") + (("_source",) if with_source else ())
    return Dataset.from_dict({k: [r[k] for r in records] for k in columns})


# ---- bad records: every one named, all reported at once --------------------------------------------

HINTS = {"leaves no room": "raise --max_length or lower --max_prompt_length",
         "identical": "drop those records, or pass --skip_invalid"}


def report_bad_records(errors, total, skip_invalid, verbose=True):
    """errors: (name, reason) pairs out of `total` records. Raise a ValueError listing them (the first 20), or
    with skip_invalid print them and go on. If every record fails for the same reason, that is a setting to
    change, not records to drop: an error with a hint, skip_invalid or not."""
    if not errors:
        return
    reasons = {re.sub(r"\d+", "N", reason) for _, reason in errors}  # "the prompt (41 tokens)" is alike for all N
    if len(errors) == total and len(reasons) == 1:  # dropping them all would leave nothing to train on
        name, reason = errors[0]
        hint = next((fix for key, fix in HINTS.items() if key in reason), "check the data")
        raise ValueError(f"all {total} records fail alike, e.g. {name}: {reason}; {hint}")
    listing = "\n  ".join(f"{name}: {reason}" for name, reason in errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
    if not skip_invalid:
        raise ValueError(f"{len(errors)} of {total} records are invalid (--skip_invalid drops them):\n  {listing}")
    if verbose:
        print(f"skipping {len(errors)} of {total} invalid records:\n  {listing}")


def tokenize_records(tokenizer, records, max_length=512, max_prompt_length=256, skip_invalid=False, verbose=True):
    """dpo.tokenize_pair over records, each named by its "_source" key (file:line) or its index. A bad record
    is an error listing every bad one; skip_invalid drops and reports them. Truncation is reported once.
    Returns (examples, kept_indices)."""
    examples, kept, errors, cut = [], [], [], {"pairs": 0, "prompt": 0, "response": 0}
    for i, record in enumerate(records):
        try:
            check_record(record)
            example, cuts = tokenize_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"],
                                          max_length, max_prompt_length, with_cuts=True)
        except ValueError as e:
            errors.append((record.get("_source", f"record {i}") if isinstance(record, dict) else f"record {i}", str(e)))
            continue
        examples.append(drop_eos_of_truncated(example, record, tokenizer.eos_token_id))
        kept.append(i)
        cut["pairs"] += cuts["prompt"] or cuts["response"]
        cut["prompt"] += cuts["prompt"]
        cut["response"] += cuts["response"]
    report_bad_records(errors, len(records), skip_invalid, verbose)
    if verbose and cut["pairs"]:
        print(f"truncated {cut['pairs']} of {len(examples)} pairs to max_length={max_length} "
              f"(prompt cut in {cut['prompt']}, response cut in {cut['response']})")
    return examples, kept


def drop_eos_of_truncated(example, record, eos_token_id):
    """A response that a sampler cut at its token budget did not end: a record marking it ("chosen_truncated" or
    "rejected_truncated" true) gets no closing EOS on that side, so the policy is not taught to stop where the sampler
    stopped (the authors' code and TRL append EOS to every response: theirs are whole texts). Returns the example."""
    for side in ("chosen", "rejected"):
        if record.get(f"{side}_truncated") and example[f"{side}_input_ids"][-1] == eos_token_id:
            example[f"{side}_input_ids"] = example[f"{side}_input_ids"][:-1]
            example[f"{side}_labels"] = example[f"{side}_labels"][:-1]
    return example


def validate_preferences(records, skip_invalid=False):
    """Check every {"prompt", "chosen", "rejected"} record: missing field, non-string, empty or
    whitespace-only text, chosen == rejected. Raises ValueError naming each bad record's index and
    field; with skip_invalid returns only the valid records (and prints how many were dropped)."""
    valid, errors = [], []
    for i, record in enumerate(records):
        try:
            check_record(record)
            valid.append(record)
        except ValueError as e:
            errors.append((f"record {i}", str(e)))
    report_bad_records(errors, len(records), skip_invalid)
    return valid


# ---- IMDb prompts for the sentiment experiment ---------------------------------------------------

def imdb_prefixes(texts, tokenizer, min_tokens=2, max_tokens=8, seed=0):
    """One review prefix per text, of min_tokens..max_tokens tokens (the paper's prompts), the length
    drawn uniformly with a seeded generator (a text shorter than min_tokens is its own prefix)."""
    rng = random.Random(seed)
    prefixes = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = rng.randint(min_tokens, max(min_tokens, min(max_tokens, len(ids))))
        prefixes.append(tokenizer.decode(ids[:n]))
    return prefixes


def load_imdb(name_or_path="stanfordnlp/imdb", split="train", tokenizer=None, min_tokens=2, max_tokens=8,
              seed=0, **load_kwargs):
    """IMDb (schema: text, label) -> a Dataset with 'text' (the review, for SFT; HTML line breaks
    made spaces), 'label', and, given a tokenizer, 'prompt' (a 2-8 token prefix of the review)."""
    from datasets import Dataset
    raw = _load_raw(name_or_path, split, **load_kwargs)
    texts = [t.replace("<br />", " ").strip() for t in column(raw, "text")]
    columns = {"text": texts, "label": list(column(raw, "label"))}
    if tokenizer is not None:
        columns["prompt"] = imdb_prefixes(texts, tokenizer, min_tokens, max_tokens, seed)
    return Dataset.from_dict(columns)


# ---- TL;DR supervised data: posts and their human-written summaries -------------------------------

def load_tldr_sft(name_or_path="CarperAI/openai_summarize_tldr", split="train", skip_invalid=False, **load_kwargs):
    """The TL;DR SFT data (schema: prompt, label; splits train / valid / test): each Reddit post as the
    paper's prompt ("SUBREDDIT: ...\\nTITLE: ...\\nPOST: ...\\nTL;DR:") and its human-written reference
    summary, what the paper's SFT model learns from and what its win rates are measured against.
    Returns a Dataset with string columns prompt (ending in "TL;DR:") and response (one leading
    space, as _from_tldr writes the comparisons' summaries). A row with an empty or missing prompt
    or label is an error naming it, unless skip_invalid drops and reports it."""
    from datasets import Dataset
    raw = _load_raw(name_or_path, split, **load_kwargs)
    records, errors = [], []
    for i, row in enumerate(raw):
        try:
            for field in ("prompt", "label"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise ValueError(f"{field!r} is missing or empty")
            records.append({"prompt": row["prompt"].rstrip(), "response": " " + row["label"].strip()})
        except ValueError as e:
            errors.append((f"{name_or_path}[{i}]", str(e)))
    report_bad_records(errors, len(raw), skip_invalid)
    return Dataset.from_dict({k: [r[k] for r in records] for k in ("prompt", "response")})
