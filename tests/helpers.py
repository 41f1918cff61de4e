"""Test helpers: a real model whose generate is steered to write chosen text."""

from transformers import LogitsProcessor, LogitsProcessorList


class _Force(LogitsProcessor):
    """Force ``script`` token by token from the first generated position, then sample freely.

    ``script`` is one token list for every row, or a list of them, one per row (None: free)."""

    def __init__(self, script, prompt_width: int):
        self.script, self.prompt_width = script, prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        per_row = self.script if self.script and isinstance(self.script[0], list | type(None)) else None
        if per_row is None:
            per_row = [self.script] * scores.shape[0]
        scores = scores.clone()
        for row, script in enumerate(per_row[: scores.shape[0]]):
            if script is not None and step < len(script):
                scores[row] = float("-inf")
                scores[row, script[step]] = 0.0
        return scores


class ScriptedModel:
    """Wraps a real Qwen2.5-VL; call k of ``generate`` starts with ``scripts[k]`` (text), then samples.

    ``scripts[k]`` may also be a list of texts, one per row of call k (None: that row is free).

    Everything else (the forward, the weights) is the real model's.
    """

    def __init__(self, model, tokenizer, scripts: list[str | None]):
        self.model, self.tokenizer, self.scripts = model, tokenizer, scripts
        self.calls = 0

    def generate(self, **kwargs):
        script = self.scripts[self.calls] if self.calls < len(self.scripts) else None
        self.calls += 1
        if isinstance(script, list):
            ids = [None if s is None else self.tokenizer.encode(s, add_special_tokens=False) for s in script]
            kwargs["logits_processor"] = LogitsProcessorList([_Force(ids, kwargs["input_ids"].shape[1])])
        elif script is not None:
            ids = self.tokenizer.encode(script, add_special_tokens=False)
            kwargs["logits_processor"] = LogitsProcessorList([_Force(ids, kwargs["input_ids"].shape[1])])
        return self.model.generate(**kwargs)

    def steer(self, rows, scores):
        """The same scripts for the continuous-batching stream (``mgpo.core.stream``): a row of turn
        k (its key: (k, the request's first row)) follows ``scripts[k - 1]``, or its own entry of it."""
        scores = scores.clone()
        for r, row in enumerate(rows):
            turn, first = row.key
            script = self.scripts[turn - 1] if turn - 1 < len(self.scripts) else None
            if isinstance(script, list):
                script = script[first + row.copy] if first + row.copy < len(script) else None
            if script is None:
                continue
            ids = self.tokenizer.encode(script, add_special_tokens=False)
            if len(row.tokens) < len(ids):
                scores[r] = float("-inf")
                scores[r, ids[len(row.tokens)]] = 0.0
        return scores

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode=True):
        self.model.train(mode)
        return self


class CountingModel(ScriptedModel):
    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, [])
