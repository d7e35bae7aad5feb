"""Launched by tests/test_ddp.py under ``accelerate launch`` / ``torchrun`` with 2 processes: trains the tiny
recipe's stage 1 and stage 2 through the real loop, then each rank saves its own copy of the trainable
parameters (``rank{r}.pt``) and the world size, so the test can check that the replicas stayed identical."""
import sys
from pathlib import Path

import torch

from lola_train.pipeline import data_loader, make_accelerator
from lola_train.recipe import load_recipe
from lola_train.train.checkpoint import trainable_state
from lola_train.train.finetune import lm_loss_fn, lm_summarize
from lola_train.train.loop import train_loop
from lola_train.train.metrics import MetricsLogger
from lola_train.train.student import add_lora, load_converted
from lola_train.train.transfer import transfer_loss_fn
from lola_train.convert import hybrid_layers, set_transfer_mode


def main(out: str) -> None:
    recipe = load_recipe(["recipe=tiny", f"output_dir={out}", "transfer.max_steps=3", "finetune.max_steps=3",
                          "transfer.eval_every=3", "finetune.eval_every=3", "transfer.grad_accum=1",
                          "finetune.grad_accum=1"])
    acc = make_accelerator()
    metrics = MetricsLogger(Path(out), enabled=acc.is_main_process)
    model, tok = load_converted(recipe, transfer=True)
    data = data_loader(recipe, acc)(tok, model.config.vocab_size)
    initial = trainable_state([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    t = recipe.transfer
    train_loop(stage="transfer", model=model, loss_fn=transfer_loss_fn(hybrid_layers(model), t.mse_factor, 0.0),
               train=data["train"], val=data["val"], cfg=t, folder=Path(out) / "transfer", accelerator=acc,
               metrics=metrics, seed=recipe.seed)
    stage1 = trainable_state([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    set_transfer_mode(model, False)
    peft_model = add_lora(model, recipe.finetune)
    train_loop(stage="finetune", model=peft_model, loss_fn=lm_loss_fn, train=data["train"], val=data["val"],
               cfg=recipe.finetune, folder=Path(out) / "finetune", accelerator=acc, metrics=metrics,
               seed=recipe.seed, summarize=lm_summarize)
    stage2 = trainable_state([(n, p) for n, p in peft_model.named_parameters() if p.requires_grad])
    torch.save({"world": acc.num_processes, "rank": acc.process_index, "initial": initial, "stage1": stage1,
                "stage2": stage2}, Path(out) / f"rank{acc.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
