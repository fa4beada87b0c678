"""LoRA training (peft) and the model folders train hands back: ℓ = 0 at step 0, exact resume, folders
that load with plain transformers / peft and generate, eval on an adapter, the card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cachefixture import STORIES, STORY_GROUPS, build_cache, text_groups
from safetensors.torch import load_file

from gvpo_offline.model.adapters import LoraSettings
from gvpo_offline.model.loading import load_model
from gvpo_offline.model.logprobs import sequence_logps
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.train.config import TrainConfig
from gvpo_offline.stages.train.recipe import train


@pytest.fixture(scope="module")
def lora_cache(tmp_path_factory) -> Path:
    """STORY_GROUPS scored by a private copy of stories260K (so a test may change the base); the last
    group is held out as the eval split."""
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    shutil.copytree(STORIES, base)
    groups = text_groups(base, STORY_GROUPS)
    groups[-1].split = "eval"
    build_cache(root / "run", base, groups)
    return root


@pytest.fixture
def workdir(lora_cache, tmp_path) -> Path:
    shutil.copytree(lora_cache / "run", tmp_path / "run")
    return tmp_path / "run"


def config(workdir: Path, **kw) -> TrainConfig:
    defaults = dict(workdir=workdir, beta=1.0, lr=5e-3, groups_per_step=2, save_every=0, progress=False,
                    device="cpu", lora=LoraSettings(r=4))
    return TrainConfig(**{**defaults, **kw})


def first_metrics(workdir: Path) -> dict:
    return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])


def logps_of(model, prompt: list[int], responses: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model, [prompt] * len(responses), responses).double()


def test_lora_starts_at_the_reference_and_its_folders_load_with_plain_peft_and_transformers(workdir, tmp_path,
                                                                                             lora_cache):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = tmp_path / "full"
    shutil.copytree(workdir, full)
    # packed rows here (each prompt once), padded rows in the other tests: LoRA runs through both paths
    train(config(full, lora=None, max_steps=1, packing="on"), log=lambda _: None)
    train(config(workdir, max_steps=3, merge=True, packing="on"), log=lambda _: None)
    # B = 0 and eval mode: step 0 computes the base model's function exactly, as full fine-tuning does
    lora0, full0 = first_metrics(workdir), first_metrics(full)
    assert lora0["loss"] == full0["loss"] and lora0["log_ratio_absmax"] == full0["log_ratio_absmax"] < 1e-4

    adapter, merged = workdir / "model", workdir / "model-merged"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (lora_cache / "base").resolve())  # a local base: its absolute folder
    for folder in (adapter, merged):
        assert (folder / "generation_config.json").is_file() and (folder / "train_config.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    prompt = tokenizer("Once upon a time", return_tensors="pt")
    for model in (peft_model, plain):
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        assert out.shape[1] > prompt["input_ids"].shape[1]

    # the adapter on its base, the merged model and our loader (merged on load) give the same log-probs;
    # the trained ones differ from the base's
    ids = tokenizer("Lily went to the park.")["input_ids"]
    responses = [tokenizer(" She saw a bird.", add_special_tokens=False)["input_ids"],
                 tokenizer(" She cried.", add_special_tokens=False)["input_ids"]]
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    a = logps_of(peft_model, ids, responses)
    b = logps_of(plain, ids, responses)
    c = logps_of(load_model(adapter, torch.device("cpu")), ids, responses)
    base = logps_of(load_model(base_path, torch.device("cpu")), ids, responses)
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, c, atol=1e-4)
    assert (a - base).abs().max() > 1e-3


def test_lora_resume_is_exact(workdir, tmp_path):
    """Steps 2-3 resumed from the step-1 checkpoint end with the uninterrupted run's adapter, bit for bit."""
    cfg = dict(max_steps=3, save_every=1, keep_checkpoints=5)
    train(config(workdir, **cfg), log=lambda _: None)
    uninterrupted = load_file(workdir / "model" / "adapter_model.safetensors")
    checkpoint = workdir / "checkpoints" / "step-1"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "tokenizer_config.json").is_file()
    for later in ("step-2", "step-3"):
        shutil.rmtree(workdir / "checkpoints" / later)
    shutil.rmtree(workdir / "model")

    result = train(config(workdir, resume=True, **cfg), log=lambda _: None)
    assert result.resumed_from == 1 and result.steps == 3
    resumed = load_file(workdir / "model" / "adapter_model.safetensors")
    assert uninterrupted.keys() == resumed.keys() and len(resumed) > 0
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    with pytest.raises(GvpoError, match="--lora"):  # the resumed run must be a LoRA run of the same shape
        train(config(workdir, resume=True, lora=LoraSettings(r=8), **cfg), log=lambda _: None)


def test_eval_and_sample_take_an_adapter_the_card_and_a_changed_base(workdir, lora_cache, run_cli, tmp_path):
    from huggingface_hub import ModelCard

    from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate

    train(config(workdir, max_steps=2, merge=True, lora=LoraSettings(r=2, target_modules="q_proj,v_proj")),
          log=lambda _: None)
    prompts, reward = tmp_path / "prompts.txt", tmp_path / "reward.py"
    prompts.write_text("Once upon a time\nTom had a toy car.\n")
    reward.write_text("def length(prompt, response):\n    return float(len(response.split()))\n")
    samples = {}
    for name in ("model", "model-merged"):  # sample from the adapter folder = from the merged model
        out = tmp_path / f"{name}.jsonl"
        res = run_cli("sample", prompts, "--model", workdir / name, "--k", "2", "--reward", f"{reward}:length",
                      "-o", out, "--max-new-tokens", "8", "--device", "cpu")
        assert res.code == 0, res.err
        samples[name] = [json.loads(line)["responses"] for line in out.read_text().splitlines()]
    assert samples["model"] == samples["model-merged"] and len(samples["model"]) == 2

    card = ModelCard.load(workdir / "model" / "README.md")
    assert card.data.library_name == "peft" and "gvpo" in card.data.tags and "Not evaluated yet" in card.text
    report = evaluate(EvalConfig(workdir=str(workdir), model_path=str(workdir / "model"), bootstrap=50,
                                 device="cpu"))
    assert not report.model_is_reference and report.beta == 1.0
    assert report.model["mean_log_ratio"] != 0.0
    text = (workdir / "model" / "README.md").read_text()
    assert "| gvpo_loss |" in text and "Not evaluated yet" not in text
    loss_row = next(line for line in text.splitlines() if line.startswith("| gvpo_loss |"))
    assert f"{report.model['gvpo_loss']:.4g}" in loss_row
    assert "[" in loss_row  # the interval

    base = lora_cache / "base"  # the adapter's base changes: loading the adapter is refused
    saved = base / "model.safetensors"
    backup = saved.read_bytes()
    try:
        weights = load_file(saved)
        weights = {k: v * 1.01 for k, v in weights.items()}
        from safetensors.torch import save_file

        save_file(weights, saved, metadata={"format": "pt"})
        with pytest.raises(GvpoError, match="trained on another base model"):
            load_model(workdir / "model", torch.device("cpu"))
    finally:
        saved.write_bytes(backup)


def test_full_model_folder_and_checkpoint_load_with_plain_transformers(workdir):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(config(workdir, lora=None, max_steps=2, save_every=1), log=lambda _: None)
    for folder in (workdir / "model", workdir / "checkpoints" / "step-2"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        prompt = tokenizer("Tom had a toy car.", return_tensors="pt")
        assert model.generate(**prompt, max_new_tokens=5, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
        assert (folder / "generation_config.json").is_file()
    card = ModelCard.load(workdir / "model" / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None  # a folder, not a hub id
    assert "full fine-tuning" in card.text and "| β (KL strength) | 1 |" in card.text


def test_lora_options_are_checked(workdir):
    with pytest.raises(GvpoError, match="--lora-r must be >= 1"):
        LoraSettings(r=0)
    with pytest.raises(GvpoError, match="--merge, --base-dtype and --load-in-4bit apply to LoRA"):
        TrainConfig(workdir=workdir, merge=True)
    with pytest.raises(GvpoError, match="LoRA: "):
        train(config(workdir, max_steps=1, lora=LoraSettings(r=2, target_modules="no_such_proj")), log=lambda _: None)


def test_an_adapter_folder_as_the_reference_model(workdir, tmp_path):
    """precompute-ref --model ADAPTER scores with the adapter merged into its base; a new LoRA on top of
    an adapter is refused (its base would be an adapter)."""
    from gvpo_offline.data import DataConfig
    from gvpo_offline.data.tokenize import TokenizeConfig
    from gvpo_offline.model.loading import model_fingerprint
    from gvpo_offline.stages.reference.cache import load_split
    from gvpo_offline.stages.reference.compute import PrecomputeConfig, precompute

    train(config(workdir, max_steps=2), log=lambda _: None)
    adapter = workdir / "model"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n"
                            for p, r, w in STORY_GROUPS[:2]))
    run = tmp_path / "on-adapter"
    manifest = precompute(PrecomputeConfig(
        data=DataConfig((str(data),)), model=str(adapter), workdir=run, eval_fraction=0.0, device="cpu",
        tokenize=TokenizeConfig(max_length=96, max_prompt_length=32), progress=False,
    ))
    assert manifest.model_fingerprint == model_fingerprint(adapter) != model_fingerprint(STORIES)
    table = load_split(run, "train")
    merged = load_model(adapter, torch.device("cpu"))
    with torch.no_grad():
        expected = sequence_logps(merged, table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist())
    assert torch.allclose(torch.tensor(table["ref_logp"].to_pylist(), dtype=torch.float64), expected.double(), atol=1e-4)
    with pytest.raises(GvpoError, match="is a LoRA adapter"):
        train(config(run, max_steps=1), log=lambda _: None)


# ---- adapter options (issue 24.4): --lora-target, rsLoRA, DoRA, --modules-to-save, --merge's dtype, QLoRA --


def _peft_logps(adapter: Path, ids, responses) -> torch.Tensor:
    from peft import AutoPeftModelForCausalLM

    return logps_of(AutoPeftModelForCausalLM.from_pretrained(adapter).eval(), ids, responses)


@pytest.mark.parametrize("options", [dict(use_rslora=True, alpha=8.0), dict(use_dora=True),
                                     dict(modules_to_save=("lm_head",))], ids=["rslora", "dora", "modules_to_save"])
def test_adapter_options_start_at_the_reference_train_and_load_with_plain_peft(workdir, lora_cache, options):
    """rsLoRA, DoRA and a fully trained lm_head: ℓ = 0 at step 0 (to rounding), one step moves the policy,
    and the adapter folder loads with plain peft into the function train computed."""
    from transformers import AutoTokenizer

    train(config(workdir, max_steps=1, lr=1e-2, lora=LoraSettings(r=4, **options)), log=lambda _: None)
    assert first_metrics(workdir)["log_ratio_absmax"] < 1e-5  # the base's function at step 0
    adapter = workdir / "model"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_rslora"] == options.get("use_rslora", False) and saved["use_dora"] == options.get("use_dora", False)
    assert (saved["modules_to_save"] or []) == list(options.get("modules_to_save", ()))

    from peft import AutoPeftModelForCausalLM

    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    if options.get("use_rslora"):  # α/√r, not α/r
        from peft.tuners.lora import LoraLayer

        scalings = {m.scaling["default"] for m in peft_model.modules() if isinstance(m, LoraLayer)}
        assert scalings == {8.0 / 4 ** 0.5}
    weights = load_file(adapter / "adapter_model.safetensors")
    if options.get("use_dora"):
        assert any("lora_magnitude_vector" in k for k in weights)
    if options.get("modules_to_save"):
        head = next(v for k, v in weights.items() if "lm_head" in k)
        base_head = load_model(lora_cache / "base", torch.device("cpu")).get_output_embeddings().weight
        assert head.shape == base_head.shape and (head - base_head).abs().max() > 0  # trained in full, saved

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer("Lily went to the park.")["input_ids"]
    responses = [tokenizer(" She saw a bird.", add_special_tokens=False)["input_ids"],
                 tokenizer(" She cried.", add_special_tokens=False)["input_ids"]]
    trained = logps_of(peft_model, ids, responses)
    assert torch.allclose(trained, logps_of(load_model(adapter, torch.device("cpu")), ids, responses), atol=1e-4)
    base = logps_of(load_model(lora_cache / "base", torch.device("cpu")), ids, responses)
    assert (trained - base).abs().max() > 1e-4  # the step trained it


def test_lora_target_takes_names_a_regex_or_all_linear(workdir):
    from peft.tuners.lora import LoraLayer

    def targeted(settings: LoraSettings) -> set[str]:
        model = add_lora(load_model(STORIES, torch.device("cpu")), settings)
        return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}

    from gvpo_offline.model.adapters import add_lora

    every = targeted(LoraSettings(r=2))
    assert {n.rsplit(".", 1)[-1] for n in every} >= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj"}
    assert "lm_head" not in every
    names = targeted(LoraSettings(r=2, target_modules="q_proj, v_proj"))
    assert names == {n for n in every if n.endswith(("q_proj", "v_proj"))}
    regex = targeted(LoraSettings(r=2, target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert regex == {n for n in names if ".layers.0." in n} and len(regex) == 2
    with pytest.raises(GvpoError, match="neither module names nor a valid regular expression"):
        LoraSettings(r=2, target_modules="(q_proj")


def test_lora_target_modules_stays_an_alias_on_the_command_line_and_in_config_files(workdir, run_cli, tmp_path):
    res = run_cli("train", "--workdir", workdir, "--beta", "1", "--lr", "1e-3", "--max-steps", "1", "--device", "cpu",
                  "--lora-r", "2", "--lora-target-modules", "q_proj", "--save-every", "0")
    assert res.code == 0, res.err
    assert json.loads((workdir / "model" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  lora_r: 2\n  lora_target_modules: v_proj\n  use_rslora: true\n")
    res = run_cli("train", "--config", cfg, "--workdir", workdir, "--beta", "1", "--lr", "1e-3", "--max-steps", "1",
                  "--device", "cpu", "--save-every", "0", "--overwrite")
    assert res.code == 0, res.err
    saved = json.loads((workdir / "model" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["v_proj"] and saved["use_rslora"] is True
    res = run_cli("train", "--workdir", workdir, "--beta", "1", "--use-dora")
    assert res.code == 2 and "need --lora-r" in res.err


def test_merge_writes_the_base_checkpoints_own_dtype(tmp_path):
    """A bf16 base trained with a float32 --base-dtype: model-merged/ is bf16 (not twice the size in fp32) and
    equals peft's own merge of the adapter into the fp32 base, rounded to bf16."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base-bf16"
    shutil.copytree(STORIES, base)
    AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16).save_pretrained(base)
    build_cache(tmp_path / "run", base, text_groups(base, STORY_GROUPS))
    train(config(tmp_path / "run", max_steps=2, merge=True), log=lambda _: None)
    merged = load_file(tmp_path / "run" / "model-merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                         tmp_path / "run" / "model").merge_and_unload().to(torch.bfloat16)
    reference = expected.state_dict()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
    assert any(not torch.equal(merged[k], load_file(base / "model.safetensors")[k]) for k in merged)


def test_load_in_4bit_is_refused_without_cuda_and_against_a_cache_made_the_other_way(workdir, run_cli, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "responses": r, "rewards": w}) + "\n" for p, r, w in STORY_GROUPS))
    res = run_cli("precompute-ref", data, "--model", STORIES, "--workdir", tmp_path / "q", "--load-in-4bit",
                  "--device", "cpu")
    assert res.code == 2 and "Traceback" not in res.err and len(res.err.strip().splitlines()) == 1
    assert "--load-in-4bit needs a CUDA GPU" in res.err and not (tmp_path / "q" / "ref").exists()
    res = run_cli("train", "--workdir", workdir, "--beta", "1", "--load-in-4bit")
    assert res.code == 2 and "add --lora-r" in res.err
    with pytest.raises(GvpoError, match="--merge with --load-in-4bit"):
        config(workdir, load_in_4bit=True, merge=True)
    with pytest.raises(GvpoError, match="computed from the unquantised base"):
        train(config(workdir, max_steps=1, load_in_4bit=True), log=lambda _: None)

    manifest = json.loads((workdir / "manifest.json").read_text())
    manifest["inputs"]["load_in_4bit"] = True  # what precompute-ref --load-in-4bit records
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GvpoError, match="computed from the 4-bit base"):
        train(config(workdir, max_steps=1), log=lambda _: None)
    res = run_cli("train", "--workdir", workdir, "--beta", "1", "--lora-r", "2", "--load-in-4bit", "--device", "cpu")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1 and "needs a CUDA GPU" in res.err, res.err
    assert not (workdir / "model").exists()


def test_resume_with_the_new_adapter_options_and_from_a_checkpoint_older_than_them(workdir):
    """Settings with modules_to_save (a tuple, a list in JSON) resume; a checkpoint written before the
    options existed (no use_rslora/use_dora/modules_to_save/load_in_4bit keys) resumes a plain LoRA run;
    a changed option is refused."""

    def run(lora: LoraSettings, **kw):
        return train(config(workdir, max_steps=2, save_every=1, keep_checkpoints=5, overwrite=True, lora=lora, **kw),
                     log=lambda _: None)

    def back_to_step_1():
        shutil.rmtree(workdir / "checkpoints" / "step-2")
        shutil.rmtree(workdir / "model")

    options = LoraSettings(r=4, use_rslora=True, modules_to_save=("lm_head",))
    run(options)
    back_to_step_1()
    assert run(options, resume=True).resumed_from == 1
    back_to_step_1()
    with pytest.raises(GvpoError, match="--lora"):
        run(LoraSettings(r=4, use_rslora=True), resume=True)

    shutil.rmtree(workdir / "checkpoints")
    run(LoraSettings(r=4))
    back_to_step_1()
    state_path = workdir / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    for key in ("use_rslora", "use_dora", "modules_to_save"):
        del state["config"]["lora"][key]
    del state["config"]["load_in_4bit"]
    state_path.write_text(json.dumps(state))
    assert run(LoraSettings(r=4), resume=True).resumed_from == 1


def test_load_in_4bit_without_bitsandbytes_names_the_extra(monkeypatch):
    import sys

    from gvpo_offline.model import quantization

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(GvpoError, match=r"--load-in-4bit needs bitsandbytes: pip install 'gvpo-offline\[qlora\]'"):
        quantization.require_cuda(torch.device("cuda"))  # the CUDA check passes on a cuda device
    with pytest.raises(GvpoError, match="needs a CUDA GPU"):
        quantization.require_cuda(torch.device("cpu"))


def test_lora_dropout_acts_while_training(workdir, tmp_path):
    """--lora-dropout used to be a no-op (the policy trains in eval mode): now the LoRA dropout layers
    alone train, so a run with dropout ends elsewhere than the same run without; ℓ = 0 at step 0 still."""
    plain = tmp_path / "plain"
    shutil.copytree(workdir, plain)
    train(config(plain, max_steps=2, lr=1e-2), log=lambda _: None)
    train(config(workdir, max_steps=2, lr=1e-2, lora=LoraSettings(r=4, dropout=0.5)), log=lambda _: None)
    assert first_metrics(workdir)["log_ratio_absmax"] < 1e-5  # B = 0 at step 0: dropout cannot act yet
    with_dropout = load_file(workdir / "model" / "adapter_model.safetensors")
    without = load_file(plain / "model" / "adapter_model.safetensors")
    assert any(not torch.equal(with_dropout[k], without[k]) for k in without)

    from gvpo_offline.model.adapters import add_lora, train_dropout

    model = add_lora(load_model(STORIES, torch.device("cpu")), LoraSettings(r=2, dropout=0.5))
    assert train_dropout(model) > 0
    dropouts = [m for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert {m.training for m in dropouts} == {True}
    assert not model.get_base_model().model.layers[0].self_attn.training  # everything else: eval mode


def test_eval_of_a_model_against_a_4bit_reference_says_it_is_scored_unquantised(workdir):
    import io

    from rich.console import Console

    from gvpo_offline.stages.evaluate.heldout import EvalConfig, evaluate

    train(config(workdir, max_steps=1), log=lambda _: None)
    manifest = json.loads((workdir / "manifest.json").read_text())
    manifest["inputs"]["load_in_4bit"] = True  # what precompute-ref --load-in-4bit records
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    out = io.StringIO()
    evaluate(EvalConfig(workdir=str(workdir), model_path=str(workdir / "model"), bootstrap=0, device="cpu"),
             Console(file=out, width=400))
    assert "the reference log-probs came from the 4-bit base" in out.getvalue()
