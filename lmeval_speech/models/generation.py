"""Owns ``lslm``'s generation side of lm-eval's API: ``generate_until`` (batched, each audio encoded once,
lm-eval's stopping criteria, failed items as marked empty answers) and ``loglikelihood_rolling`` (text
only); a mixin of ``LSLM``."""

from __future__ import annotations

import json

import torch
from lm_eval import utils as lm_utils
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from lmeval_speech import outcomes
from lmeval_speech.models.plan import AudioRequestError, Seq, audio_items


class Generation:
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in tqdm(requests, desc="Running loglikelihood_rolling requests", disable=disable_tqdm or self.rank != 0):
            if audio_items(req.args):
                raise AudioRequestError("loglikelihood_rolling scores text only; drop doc_to_audio from the task")
            (string,) = req.args[:1]
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            )
            pre = [((None, None), ctx, cont) for ctx, cont in windows]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(pre, disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        """Batched greedy/sampled generation: requests with the same generation kwargs are batched
        (lm-eval's ``Collator``, longest first), left-padded, and every row stops at its stop
        strings during generation (lm-eval's stopping criteria); each audio is encoded once."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        if self.intervener is not None and requests:
            # generation installs no hooks: its answers would be the unedited model's, recorded as intervened
            raise ValueError(f"intervention={self.intervener.spec.kind} applies to log-likelihood scoring only; "
                             f"{requests[0].task_name} is a generation task: run it without intervention=")
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        items, per_request, status = self._plan(requests)
        out: list = [None] * len(requests)
        todo = []
        for i, (req, keys) in enumerate(zip(requests, per_request, strict=True)):
            failed, truncated = self._outcome(keys, status)
            if failed:  # an empty generation marked as failed, never an answer
                out[i] = outcomes.ScoredText("", failed=failed)
                continue
            try:  # a cascade twin: each marker becomes its transcript, and the prompt is text only
                context, keys, transcript = self.audio.heard_as_text(req.args[0], keys)
            except AudioRequestError as err:
                if self.audio_settings.fail_fast:
                    raise
                out[i] = outcomes.ScoredText("", failed=f"AudioRequestError: {err}")
                continue
            todo.append((i, req, keys, truncated, context, transcript))
        pbar = tqdm(total=len(todo), desc="Running generate_until requests", disable=disable_tqdm or self.rank != 0)
        # batches share generation kwargs and modality (a modality-dependent model, e.g. Granite's
        # speech LoRA, is switched per batch)
        collator = Collator([(i, context, req.args[1], bool(keys)) for i, req, keys, _, context, _ in todo],
                            sort_fn=lambda x: (-len(x[1]), x[1]), group_by="gen_kwargs",
                            group_fn=lambda x: (json.dumps(x[2], sort_keys=True, default=str), x[3]))
        info = {i: (req, keys, (truncated, transcript)) for i, req, keys, truncated, _, transcript in todo}
        for chunk in collator.get_batched(n=max(1, self.batch_size), batch_fn=None):
            kwargs = normalize_gen_kwargs(dict(chunk[0][2]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            seqs = []
            for index, context, _, _ in chunk:
                req, keys, _ = info[index]
                try:
                    if keys:
                        context = self.planner.place_audio(context, len(keys), self._chat_applied)
                    tokens, spans = self.planner.expand(self.tok_encode(context), keys)
                    cut = max(0, len(tokens) - (self.max_length - max_new))
                    if cut and spans and spans[0][0] < cut:
                        raise AudioRequestError(f"prompt of {len(tokens)} tokens leaves no room for the audio "
                                                "within max_length")
                except AudioRequestError as err:  # this item only, as in loglikelihood
                    if self.audio_settings.fail_fast or not keys:
                        raise
                    out[index] = outcomes.ScoredText("", failed=f"AudioRequestError: {err}")
                    pbar.update(1)
                    continue
                if cut:
                    truncated, transcript = info[index][2]
                    info[index] = (req, keys, (self._with_cut(truncated, cut, len(tokens)), transcript))
                seqs.append(Seq(index, tokens[cut:], [], [(s - cut, k, n) for s, k, n in spans]))
            if not seqs:
                continue
            embeds, mask, ids = self._left_padded(seqs, items)
            self._set_modality(seqs)
            stopping = stop_sequences_criteria(self.tokenizer, until, 0, len(seqs))
            if self.backend_impl.generate_needs_ids:
                kwargs["prompt_ids"] = ids
            gen = self.backend_impl.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new, pad_token_id=self._pad_id,
                stopping_criteria=stopping, **kwargs)
            for row, s in enumerate(seqs):
                req, _, (truncated, transcript) = info[s.index]
                text = postprocess_generated_text(self.tok_decode(gen[row].tolist()), stop=until, think_end_token=None)
                if truncated or transcript:
                    text = outcomes.ScoredText(text, truncated=truncated, transcript=transcript)
                out[s.index] = text
                self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
            pbar.update(len(seqs))
        pbar.close()
        return out
