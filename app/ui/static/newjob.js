// A job from a form: the recipe's main fields; an empty field is left out, so the server's default applies
// (each placeholder shows it), and the server's error names the field at fault.

import { get, post } from "./api.js";
import { errorBox, h } from "./dom.js";

const SCHEDULERS = [
  "linear",
  "cosine",
  "cosine_with_restarts",
  "polynomial",
  "constant",
  "constant_with_warmup",
];
// [name in the request, label, kind, placeholder or options]
const TRAINING = [
  ["learning_rate", "Learning rate", "float", "2e-4"],
  ["num_train_epochs", "Epochs", "float", "3"],
  ["per_device_train_batch_size", "Batch size", "int", "4"],
  ["gradient_accumulation_steps", "Gradient accumulation steps", "int", "1"],
  ["lr_scheduler_type", "LR scheduler", "choice", ["", ...SCHEDULERS]],
  ["warmup_ratio", "Warmup ratio", "float", "0.1"],
  ["max_seq_length", "Max sequence length", "int", "2048"],
  ["logging_steps", "Logging steps", "int", "10"],
  ["eval_steps", "Eval steps", "int", "logging steps"],
  ["save_steps", "Checkpoint every N steps", "int", "none"],
];
const PEFT = [
  ["r", "LoRA r", "int", "16"],
  ["lora_alpha", "LoRA alpha", "float", "32"],
  ["lora_dropout", "LoRA dropout", "float", "0.05"],
  ["target_modules", "Target modules", "modules", "all-linear"],
  ["backend", "Backend", "choice", ["", "peft", "loralib"]],
  ["quantization", "Quantization (QLoRA)", "choice", ["", "4bit", "8bit"]],
];

export function newJobView(root, signal) {
  const error = errorBox();
  const model = h("select", { name: "model", id: "job-model", required: true });
  const training = h("select", { name: "training_file", id: "job-training-file", required: true });
  const validation = h("select", { name: "validation_file", id: "job-validation-file" });
  const suffix = h("input", {
    name: "suffix",
    id: "job-suffix",
    pattern: "[A-Za-z0-9_\\-]{1,40}",
    placeholder: "support-bot",
  });
  const seed = h("input", {
    name: "seed",
    id: "job-seed",
    type: "number",
    min: 0,
    step: 1,
    placeholder: "42",
  });
  const sections = {
    training_config: TRAINING.map(field("training_config")),
    peft_config: PEFT.map(field("peft_config")),
  };
  const form = h(
    "form",
    { id: "new-job", class: "grid-form" },
    h(
      "fieldset",
      {},
      h("legend", {}, "Job"),
      labelled("Base model", model),
      labelled("Training file", training),
      labelled("Validation file", validation),
      labelled("Suffix", suffix),
      labelled("Seed", seed),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "training_config"),
      sections.training_config.map((f) => f.label),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "peft_config"),
      sections.peft_config.map((f) => f.label),
    ),
    h("button", { type: "submit" }, "Create job"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.clear();
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    const body = { model: model.value, training_file: training.value };
    if (validation.value) body.validation_file = validation.value;
    if (suffix.value) body.suffix = suffix.value;
    if (seed.value) body.seed = Number.parseInt(seed.value, 10);
    for (const [section, fields] of Object.entries(sections)) {
      const values = Object.fromEntries(
        fields.map((f) => [f.name, f.read()]).filter(([, v]) => v !== undefined),
      );
      if (Object.keys(values).length) body[section] = values;
    }
    try {
      const job = await post("/v1/fine_tuning/jobs", body);
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      error.show(e);
      form.querySelector(`[name="${CSS.escape(e.param ?? "")}"]`)?.setAttribute("aria-invalid", "true");
    }
  });
  root.append(h("h1", {}, "New fine-tuning job"), error, form);

  Promise.all([get("/v1/models", { signal }), fileOptions(signal)])
    .then(([models, files]) => {
      // Base models only: a fine-tuned model has a parent, and jobs train from a base model.
      model.append(...models.data.filter((m) => !m.parent).map((m) => h("option", { value: m.id }, m.id)));
      training.append(...files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)));
      validation.append(
        h("option", { value: "" }, "none"),
        ...files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)),
      );
    })
    .catch((e) => e.name !== "AbortError" && error.show(e));
}

async function fileOptions(signal) {
  return (await get("/v1/files?purpose=fine-tune&limit=100", { signal })).data;
}

function labelled(text, control) {
  return h("label", {}, h("span", {}, text), control);
}

/** One recipe field: its label and control, and how to read its value (undefined when left empty). */
function field(section) {
  return ([name, text, kind, hint]) => {
    const attrs = { name: `${section}.${name}`, id: `${section}-${name}` };
    const control =
      kind === "choice"
        ? h(
            "select",
            attrs,
            hint.map((o) => h("option", { value: o }, o || "default")),
          )
        : h("input", {
            ...attrs,
            placeholder: hint,
            ...(kind === "modules" ? {} : { type: "number", step: kind === "int" ? 1 : "any", min: 0 }),
          });
    const read = () => {
      const raw = control.value.trim();
      if (!raw) return undefined;
      if (kind === "int") return Number.parseInt(raw, 10);
      if (kind === "float") return Number(raw);
      if (kind === "modules")
        return raw === "all-linear"
          ? raw
          : raw
              .split(",")
              .map((m) => m.trim())
              .filter(Boolean);
      return raw;
    };
    return { name, label: labelled(text, control), read };
  };
}
