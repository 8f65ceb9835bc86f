"""A uba_fused schedule next to a host-side one: the warning, and the trainer recipes of the README.

HF Trainer adds its own LR scheduler (linear by default) to whatever optimizer it is given. Over a
group with a uba_fused schedule the two multiplied silently: the final applied lr was 9.5e-8 instead
of 3.8e-6. Any torch LR scheduler stacks the same way.
"""

import warnings

import pytest
import torch

import uba_fused as uf

from harness import make_params, random_grads, set_grads

LR, T = 0.1, 12
SCHEDULE = uf.UBA(T, phi=0.5, warmup_steps=2)


def _steps(opt, params, sched=None, n=T):
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        set_grads(params, random_grads(params, gen))
        opt.step()
        if sched is not None:
            sched.step()


def test_a_torch_scheduler_on_a_scheduled_group_warns_once_naming_both():
    params = make_params()
    opt = uf.AdamW(params, lr=LR, schedule=SCHEDULE)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (2 * T))
    match = r"param_groups\[0\]\['lr'\] changed from 0.1 to .*set by LambdaLR\(<lambda>\), while the group has " \
            r"schedule=UBA\(total_steps=12.*multiply"
    with pytest.warns(UserWarning, match=match) as record:
        _steps(opt, params, sched)
    assert len([w for w in record if "multiply" in str(w.message)]) == 1
    assert record[0].filename == __file__  # points at the caller's opt.step()
    # What the warning is about: the applied lr is the product of both.
    expected = LR * (1.0 - (T - 1) / (2 * T)) * SCHEDULE.factor(T - 1)
    assert float(opt.get_last_lr()[0]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("setup", ["constant torch scheduler", "no uba_fused schedule", "AppliedLR"])
def test_one_schedule_at_a_time_does_not_warn(setup):
    params = make_params()
    opt = uf.AdamW(params, lr=LR, schedule=None if setup == "no uba_fused schedule" else SCHEDULE)
    sched = uf.AppliedLR(opt) if setup == "AppliedLR" else \
        torch.optim.lr_scheduler.LambdaLR(opt, (lambda t: 1.0) if setup == "constant torch scheduler" else
                                          (lambda t: 1.0 / (1 + t)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(opt, params, sched)


def test_applied_lr_reports_the_device_schedule_and_leaves_the_group_lr_alone():
    params = make_params()
    opt = uf.Lion([{"params": params[:3]}, {"params": params[3:], "lr": 0.5, "schedule": uf.Cosine(T)}], lr=LR,
                  schedule=SCHEDULE)
    sched = uf.AppliedLR(opt)
    for t in range(T):
        _steps(opt, params, sched, n=1)
        assert sched.get_last_lr() == pytest.approx([LR * SCHEDULE.factor(t), 0.5 * uf.Cosine(T).factor(t)],
                                                    rel=1e-6)
        assert [g["lr"] for g in opt.param_groups] == [LR, 0.5]
    with pytest.raises(TypeError, match="AppliedLR reports the lr a uba_fused optimizer applied; got SGD"):
        uf.AppliedLR(torch.optim.SGD(params, lr=0.1))


# ------------------------------------------------------------------ HF Trainer
class _Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 1, generator=gen) * 0.1)

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(x @ self.w, labels)}


def _data(n=64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _hf_trainer(tmp_path, scheduler_type, with_applied_lr):
    transformers = pytest.importorskip("transformers")
    model = _Regressor()
    opt = uf.AdamW(model.parameters(), lr=LR, schedule=SCHEDULE)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=T, per_device_train_batch_size=4,
                                          lr_scheduler_type=scheduler_type, logging_steps=1, report_to=[],
                                          save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    sched = uf.AppliedLR(opt) if with_applied_lr else None
    return transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=(opt, sched)), opt


def test_hf_trainer_default_scheduler_stacks_and_warns(tmp_path):
    trainer, opt = _hf_trainer(tmp_path, "linear", with_applied_lr=False)
    with pytest.warns(UserWarning, match="set by LambdaLR.*multiply"):
        trainer.train()
    assert float(opt.get_last_lr()[0]) < 0.5 * LR * SCHEDULE.factor(T - 1)  # the product, not the schedule


def test_hf_trainer_recipe_applies_and_logs_the_uba_schedule(tmp_path):
    """The README's recipe: optimizers=(opt, uf.AppliedLR(opt)). Trainer adds no scheduler, and logs the lr
    the kernel applied at each step."""
    trainer, opt = _hf_trainer(tmp_path, "linear", with_applied_lr=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert float(opt.get_last_lr()[0]) == pytest.approx(LR * SCHEDULE.factor(T - 1), rel=1e-6)
    logged = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    assert len(logged) >= T - 1
    for step, lr in logged.items():
        assert lr == pytest.approx(LR * SCHEDULE.factor(step - 1), rel=1e-6), step


def test_hf_trainer_resumes_from_a_checkpoint_as_if_uninterrupted(tmp_path):
    """The README's recipe, saved at step 6 and resumed in a new process's worth of objects: accelerate loads the
    optimizer's state dict in prepare() and Trainer loads the checkpoint's after it, a second load."""
    transformers = pytest.importorskip("transformers")

    def trainer(out, save):
        model = _Regressor()
        opt = uf.AdamW(model.parameters(), lr=LR, schedule=SCHEDULE)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=T, per_device_train_batch_size=4,
                                              report_to=[], save_strategy="steps" if save else "no", save_steps=T // 2,
                                              use_cpu=True, disable_tqdm=True, seed=0)
        return transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=(opt, uf.AppliedLR(opt)))

    whole = trainer(tmp_path / "whole", save=False)
    whole.train()
    trainer(tmp_path / "saved", save=True).train()
    resumed = trainer(tmp_path / "resumed", save=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "saved" / f"checkpoint-{T // 2}"))
    torch.testing.assert_close(resumed.model.w, whole.model.w, rtol=1e-6, atol=0)
    opt_w, opt_r = whole.optimizer.optimizer, resumed.optimizer.optimizer  # accelerate's wrapper around ours
    assert int(opt_r.param_groups[0]["schedule_step"]) == int(opt_w.param_groups[0]["schedule_step"]) == T
    assert float(opt_r.get_last_lr()[0]) == pytest.approx(LR * SCHEDULE.factor(T - 1), rel=1e-6)


# ------------------------------------------------------------------ Lightning
def test_lightning_recipe_applies_and_logs_the_uba_schedule(tmp_path):
    """The README's recipe: configure_optimizers returns the optimizer alone; training_step logs get_last_lr()."""
    pl = pytest.importorskip("lightning.pytorch")
    seen = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Regressor()

        def training_step(self, batch, _):
            self.log("lr", self.optimizers().optimizer.get_last_lr()[0])
            seen.append(float(self.optimizers().optimizer.get_last_lr()[0]))
            return self.net(**batch)["loss"]

        def configure_optimizers(self):
            return uf.AdamW(self.parameters(), lr=LR, schedule=SCHEDULE)

    loader = torch.utils.data.DataLoader(_data(), batch_size=4)
    trainer = pl.Trainer(max_steps=T, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own advice (num_workers, ...), none about the lr
        trainer.fit(module, loader)
    # Before step t, get_last_lr() holds the lr of step t - 1 (and the group's lr before the first step).
    assert seen == pytest.approx([LR] + [LR * SCHEDULE.factor(t) for t in range(T - 1)], rel=1e-6)
    opt = trainer.optimizers[0]
    assert float(opt.get_last_lr()[0]) == pytest.approx(LR * SCHEDULE.factor(T - 1), rel=1e-6)


def test_lightning_resumes_from_a_checkpoint_as_if_uninterrupted(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Regressor()

        def training_step(self, batch, _):
            return self.net(**batch)["loss"]

        def configure_optimizers(self):
            return uf.AdamW(self.parameters(), lr=LR, schedule=SCHEDULE)

    def fit(ckpt_path=None, save=False):
        module = Module()
        callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=T // 2, save_top_k=-1)] \
            if save else []
        trainer = pl.Trainer(max_steps=T, accelerator="cpu", logger=False, enable_checkpointing=save,
                             callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path))
        # an epoch of T // 2 batches: Lightning resumes a plain DataLoader at an epoch's start
        loader = torch.utils.data.DataLoader(_data(n=4 * (T // 2)), batch_size=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's own advice (num_workers, ...), none about the lr
            trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module, trainer.optimizers[0]

    whole, opt_w = fit()
    fit(save=True)
    [ckpt] = [p for p in tmp_path.glob("*.ckpt") if f"step={T // 2}" in p.name]
    resumed, opt_r = fit(ckpt_path=str(ckpt))
    torch.testing.assert_close(resumed.net.w, whole.net.w, rtol=1e-6, atol=0)
    assert int(opt_r.param_groups[0]["schedule_step"]) == int(opt_w.param_groups[0]["schedule_step"]) == T
