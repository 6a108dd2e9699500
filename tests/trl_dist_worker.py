"""One rank of test_integration_trl's two-process run (torchrun, gloo, accelerate MULTI_CPU).

Runs one DeltaGRPOTrainer step and saves, per rank, the hidden states and log-probs of the
model's own unfused forward, the per-sequence advantages, the mask and the coefficients.
Usage: torchrun --nproc_per_node=2 tests/trl_dist_worker.py OUT_DIR
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from delta_kernels.integrations import response_hidden_states  # noqa: E402
from delta_kernels.integrations.trl import DeltaGRPOTrainer  # noqa: E402
from test_integration_trl import make  # noqa: E402


class Recording(DeltaGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        r = out["completion_ids"].shape[1]
        with torch.no_grad():
            o = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logp = torch.log_softmax(o.logits[:, -r - 1:-1] / self.temperature, -1)
        res, m = self.delta_last, out["completion_mask"].bool()
        self.recorded = dict(hidden=response_hidden_states(o.hidden_states[-1], r, attention_mask=mask),
                             logp=logp.gather(-1, out["completion_ids"][..., None])[..., 0] * m, mask=m,
                             advantages=(res.weighted_advantages * m).sum(1) / (res.coef * m).sum(1), coef=res.coef,
                             gamma=torch.stack([res.stats.gamma_pos, res.stats.gamma_neg]))
        return out


def main():
    tr = make(Recording, max_steps=1, output_dir=sys.argv[1])
    tr.train()
    assert tr.accelerator.num_processes == 2, tr.accelerator.num_processes
    torch.save(tr.recorded, os.path.join(sys.argv[1], f"rank{tr.accelerator.process_index}.pt"))


if __name__ == "__main__":
    main()
