"""Task evals on the user's own items (validate.tasks), the unquantized model and every output side by side.

multiple_choice, scored as lm-evaluation-harness scores such tasks: each choice's summed log-likelihood after
the context (the delimiter before it; context and choice tokenized together, the context's trailing whitespace
moved to the choice, as lm-eval's ``_encode_pair``), BOS first. accuracy picks the highest log-likelihood,
accuracy_norm the highest per character of the delimited choice (lm-eval's acc_norm). Standard errors are
lm-eval's (the sample standard deviation over items / √n); an output's accuracy drop is paired: the mean and
standard error of (float correct - output correct) over the same items.

continuation: the unquantized model's greedy continuation of each prompt (a fixed number of tokens, no stop at
EOS), then every output run on prompt + that continuation in one pass: an output would generate the same tokens
up to the first position where its own argmax differs, so that position is where the two greedy continuations
first differ (``new_tokens`` when they never do); exact_match is the share of prompts that never differ.

Each pass holds at most validate's token budget of padded sequences per model (or one sequence, if longer), so
memory stays what validate's windows take.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from quantfab.tasks.errors import UserError
from quantfab.tasks.eval_items import task_items
from quantfab.tasks.forward import forward
from quantfab.tasks.redact import redact

LOGPROB_CHUNK = 1 << 22  # float64 log-probabilities per source at a time, as validate's metrics


def run_tasks(config, tokenizer, sources: dict[str, Any], tasks: list, digests: dict[str, str], bos: int,
              per_pass: int, dev: torch.device) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every task of ``tasks`` (validate.tasks) on every source ("fp32" is the unquantized model): what each task
    is (for the report) and, per output, its figures by task."""
    described: dict[str, Any] = {}
    per_output: dict[str, dict[str, Any]] = {k: {} for k in sources if k != "fp32"}
    for task in tasks:
        items = task_items(task.source, task.kind, task.items, digests[task.label])
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        if task.kind == "multiple_choice":
            sequences, scored = _choice_sequences(items, tokenizer, bos, task.delimiter)
            lines = [it["line"] for it in items for _ in it["choices"]]
            _refuse_long([len(q) for q in sequences], limit, task, lines)
            sums = log_likelihoods(config, sources, sequences, scored, per_pass, dev)
            base, figures = multiple_choice_figures(items, sums, task.delimiter, task.score)
        else:
            prompts = [[bos, *tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]] for it in items]
            _refuse_long([len(p) + task.new_tokens for p in prompts], limit, task, [it["line"] for it in items])
            greedy = greedy_continuations(config, sources["fp32"], prompts, task.new_tokens, per_pass, dev)
            base = {"continuation_tokens": task.new_tokens}
            figures = continuation_figures(config, sources, prompts, greedy, per_pass, dev)
        described[task.label] = {"kind": task.kind, "source": redact(task.source), "sha256": digests[task.label],
                                 "items": len(items), "baseline": base,
                                 **({"score": task.score} if task.kind == "multiple_choice" else {})}
        for key, fig in figures.items():
            per_output[key][task.label] = fig
    return described, per_output


def _refuse_long(lengths: list[int], limit: int, task, lines: list[int]) -> None:
    """Items longer than the model's context are refused by name: their scores would measure extrapolation."""
    if limit <= 0:
        return
    for length, line in zip(lengths, lines):
        if length > limit:
            raise UserError(f"{task.source}:{line}: the item is {length} tokens "
                            f"with BOS{' and the continuation' if task.kind == 'continuation' else ''}, longer than "
                            f"the model's max_position_embeddings ({limit}): shorten it or drop it")


def _choice_sequences(items: list[dict[str, Any]], tokenizer, bos: int,
                      delimiter: str) -> tuple[list[list[int]], list[int]]:
    """One token sequence per (item, choice), BOS first, and where each choice's tokens start."""
    sequences, starts = [], []
    for item in items:
        for choice in item["choices"]:
            context, continuation = item["context"], delimiter + choice
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            head = len(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
            sequences.append([bos, *whole])
            starts.append(1 + min(head, len(whole) - 1))  # at least one scored token per choice
    return sequences, starts


def _passes(lengths: list[int], per_pass: int) -> list[list[int]]:
    """Sequence indices grouped, shortest first, so that a group's padded size stays within ``per_pass`` tokens."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= per_pass:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _padded(sequences: list[list[int]], pad: int) -> torch.Tensor:
    """Right-padded: a causal model's figures at a position never read what follows it."""
    width = max(map(len, sequences))
    return torch.tensor([s + [pad] * (width - len(s)) for s in sequences], dtype=torch.long)


def _head_rows(decoder, outer: dict, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> Any:
    """Log-probabilities (float64) at the given (row, position) pairs of ``hidden``, a chunk at a time."""
    decoder.load_outer(outer)
    step = max(1, LOGPROB_CHUNK // int(decoder.config.vocab_size))
    for s in range(0, len(rows), step):
        h = hidden[rows[s:s + step], cols[s:s + step]].to(decoder.device)
        yield s, torch.log_softmax(decoder.logits(h[None])[0].double(), dim=-1)


@torch.no_grad()
def log_likelihoods(config, sources: dict[str, Any], sequences: list[list[int]], starts: list[int], per_pass: int,
                    dev: torch.device) -> dict[str, np.ndarray]:
    """Per source, the summed log-probability of each sequence's tokens from ``starts[j]`` on."""
    fp32 = sources["fp32"]
    sums = {key: np.zeros(len(sequences)) for key in sources}
    for group in _passes([len(s) for s in sequences], per_pass):
        ids = _padded([sequences[j] for j in group], pad=sequences[group[0]][0])
        decoder, hidden = forward(config, sources, fp32, ids, dev)
        rows, cols, targets = [], [], []
        for r, j in enumerate(group):
            for p in range(starts[j], len(sequences[j])):
                rows.append(r), cols.append(p - 1), targets.append(sequences[j][p])
        rows_t, cols_t, targets_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)
        names = fp32.checkpoint_names(decoder.exit_names())
        for key, src in sources.items():
            total = torch.zeros(len(group), dtype=torch.float64)
            for s, lp in _head_rows(decoder, src.load(names), hidden[key], rows_t, cols_t):
                picked = lp.gather(1, targets_t[s:s + len(lp), None].to(lp.device))[:, 0].cpu()
                total.index_add_(0, rows_t[s:s + len(lp)], picked)
            sums[key][group] = total.numpy()
        del hidden
    return sums


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """A mean over items and its standard error, as lm-eval computes it: sample standard deviation / √n."""
    n = len(values)
    if n < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n))


def multiple_choice_figures(items: list[dict[str, Any]], sums: dict[str, np.ndarray], delimiter: str,
                            score: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """accuracy and accuracy_norm of the float model, and per output, with its paired drop on ``score``."""
    bounds = np.cumsum([0] + [len(it["choices"]) for it in items])
    gold = np.array([it["gold"] for it in items])
    chars = np.array([len(delimiter + c) for it in items for c in it["choices"]], dtype=np.float64)

    def correct(ll: np.ndarray) -> dict[str, np.ndarray]:
        pick = np.array([ll[a:b].argmax() for a, b in zip(bounds[:-1], bounds[1:])])
        pick_norm = np.array([(ll[a:b] / chars[a:b]).argmax() for a, b in zip(bounds[:-1], bounds[1:])])
        return {"accuracy": (pick == gold).astype(np.float64), "accuracy_norm": (pick_norm == gold).astype(np.float64)}

    def figures(c: dict[str, np.ndarray]) -> dict[str, float]:
        out = {}
        for name, values in c.items():
            out[name], out[f"{name}_se"] = mean_and_se(values)
        return out

    base = correct(sums["fp32"])
    per_output = {}
    for key, ll in sums.items():
        if key == "fp32":
            continue
        c = correct(ll)
        drop, drop_se = mean_and_se(base[score] - c[score])
        per_output[key] = {**figures(c), "accuracy_drop": drop, "accuracy_drop_se": drop_se}
    return figures(base), per_output


@torch.no_grad()
def greedy_continuations(config, fp32: Any, prompts: list[list[int]], new_tokens: int, per_pass: int,
                         dev: torch.device) -> list[list[int]]:
    """The unquantized model's greedy continuation of each prompt, ``new_tokens`` long: one pass per token."""
    out: list[list[int]] = [[] for _ in prompts]
    exit_tensors: dict | None = None
    for group in _passes([len(p) + new_tokens for p in prompts], per_pass):
        seqs = [list(prompts[j]) for j in group]
        for _ in range(new_tokens):
            decoder, hidden = forward(config, {"fp32": fp32}, fp32, _padded(seqs, pad=seqs[0][0]), dev)
            if exit_tensors is None:
                exit_tensors = fp32.load(fp32.checkpoint_names(decoder.exit_names()))
            rows = torch.arange(len(seqs))
            cols = torch.tensor([len(s) - 1 for s in seqs])
            nxt = torch.cat([lp.argmax(dim=-1).cpu() for _, lp in _head_rows(decoder, exit_tensors, hidden["fp32"],
                                                                              rows, cols)])
            for s, t in zip(seqs, nxt.tolist()):
                s.append(int(t))
            del hidden
        for j, s in zip(group, seqs):
            out[j] = s[len(prompts[j]):]
    return out


@torch.no_grad()
def continuation_figures(config, sources: dict[str, Any], prompts: list[list[int]], greedy: list[list[int]],
                         per_pass: int, dev: torch.device) -> dict[str, dict[str, float]]:
    """Per output: exact_match and the mean position of the first token its greedy continuation differs at."""
    fp32 = sources["fp32"]
    outputs = {k: s for k, s in sources.items() if k != "fp32"}
    first = {key: np.zeros(len(prompts)) for key in outputs}
    sequences = [p + g for p, g in zip(prompts, greedy)]
    for group in _passes([len(s) for s in sequences], per_pass):
        decoder, hidden = forward(config, outputs, fp32, _padded([sequences[j] for j in group], pad=prompts[0][0]), dev)
        rows, cols, want = [], [], []
        for r, j in enumerate(group):
            for t, token in enumerate(greedy[j]):
                rows.append(r), cols.append(len(prompts[j]) - 1 + t), want.append(token)
        rows_t, cols_t, want_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(want)
        names = fp32.checkpoint_names(decoder.exit_names())
        for key, src in outputs.items():
            same = torch.cat([lp.argmax(dim=-1).cpu() == want_t[s:s + len(lp)]
                              for s, lp in _head_rows(decoder, src.load(names), hidden[key], rows_t, cols_t)])
            at = 0
            for j in group:
                n = len(greedy[j])
                hits = same[at:at + n]
                misses = (~hits).nonzero()
                first[key][j] = int(misses[0]) if len(misses) else n
                at += n
        del hidden
    figures = {}
    for key, positions in first.items():
        n = len(greedy[0]) if greedy else 0
        exact, exact_se = mean_and_se((positions == n).astype(np.float64))
        mean, se = mean_and_se(positions)
        figures[key] = {"exact_match": exact, "exact_match_se": exact_se, "first_difference": mean,
                        "first_difference_se": se}
    return figures
