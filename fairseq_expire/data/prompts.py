"""Prompts for fairseq's generators (fairseq-interactive, the hub's ``.sample()`` and ``.score()``).

Each prompt is one new stream: ``</s>`` (the line end before it, on which fairseq's generators condition a language
model), then its tokens. fairseq's own inference dataset for language models cuts lines with
``TokenBlockDataset(break_mode="eos")``, which numpy 2 breaks, and cannot say that a prompt starts a new stream.
"""

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils


class PromptDataset(FairseqDataset):
    """``src_tokens`` = ``</s>`` + prompt, ``target`` = prompt + ``<pad>`` (what a scorer predicts); each batch says
    ``reset_memory``: the model reads every prompt from an empty memory."""

    def __init__(self, prompts, eos: int, pad: int):
        self.prompts = [p[:-1] if len(p) and p[-1] == eos else p for p in prompts]  # encode_line appends </s>
        self.eos, self.pad = eos, pad
        self.sizes = np.array([len(p) + 1 for p in self.prompts])

    def __getitem__(self, index):
        prompt = self.prompts[index].long()
        return {
            "id": index,
            "source": torch.cat([prompt.new_tensor([self.eos]), prompt]),
            "target": torch.cat([prompt, prompt.new_tensor([self.pad])]),
        }

    def __len__(self):
        return len(self.prompts)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def collater(self, samples):
        if not samples:
            return {}
        source = data_utils.collate_tokens([s["source"] for s in samples], self.pad)
        return {
            "id": torch.tensor([s["id"] for s in samples]),
            "nsentences": len(samples),
            "ntokens": sum(len(s["target"]) - 1 for s in samples),
            "net_input": {
                "src_tokens": source,
                "src_lengths": torch.tensor([len(s["source"]) for s in samples]),
                "reset_memory": True,
            },
            "target": data_utils.collate_tokens([s["target"] for s in samples], self.pad),
        }
