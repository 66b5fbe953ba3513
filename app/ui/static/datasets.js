// Datasets: upload one (the server's line-by-line problems shown when it refuses the file), list them, and
// show one's report (tokens per example with the base model's tokenizer, what max_seq_length cuts).

import { get, upload } from "./api.js";
import { bytes, errorBox, h, time } from "./dom.js";

export function datasetsView(root, signal) {
  const error = errorBox();
  const problems = h("tbody");
  const problemTable = h(
    "table",
    { id: "upload-problems", hidden: true },
    h("thead", {}, h("tr", {}, h("th", {}, "Line"), h("th", {}, "Code"), h("th", {}, "Problem"))),
    problems,
  );
  const status = h("p", { id: "upload-status", class: "muted", role: "status" });
  const input = h("input", {
    type: "file",
    name: "file",
    id: "dataset-file",
    accept: ".jsonl,.json,.txt",
    required: true,
  });
  const files = h("tbody");
  const report = h("section", { id: "file-report", hidden: true });

  const showReport = async (file) => {
    error.clear();
    report.hidden = false;
    const title = h("h2", {}, `Report: ${file.filename}`);
    report.replaceChildren(title, h("p", { class: "muted", role: "status" }, "Counting tokens…"));
    try {
      const body = await get(`/v1/files/${encodeURIComponent(file.id)}/report`, { signal });
      report.replaceChildren(title, ...reportParts(body));
    } catch (e) {
      if (e.name === "AbortError") return;
      report.hidden = true;
      error.show(e);
    }
  };

  const refresh = async () => {
    const page = await get("/v1/files?limit=100&purpose=fine-tune", { signal });
    files.replaceChildren(...page.data.map((file) => fileRow(file, showReport)));
    if (!page.data.length)
      files.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No datasets yet.")));
  };

  const submit = async (event) => {
    event.preventDefault();
    error.clear();
    problemTable.hidden = true;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", input.files[0]);
    status.textContent = "Uploading…";
    try {
      const file = await upload("/v1/files", form);
      status.textContent = `Uploaded ${file.filename} as ${file.id}: ${file.stats?.examples ?? "?"} examples.`;
      event.target.reset();
      await refresh();
    } catch (e) {
      status.textContent = "";
      error.show(e);
      problems.replaceChildren(
        ...(e.details ?? []).map((p) =>
          h("tr", {}, h("td", {}, p.line ?? "—"), h("td", {}, p.code ?? ""), h("td", {}, p.message)),
        ),
      );
      problemTable.hidden = !e.details?.length;
    }
  };

  root.append(
    h("h1", {}, "Datasets"),
    h(
      "form",
      { id: "upload", onsubmit: submit },
      h("label", { for: "dataset-file" }, "JSONL dataset (chat, prompt/completion or text lines)"),
      input,
      h("button", { type: "submit" }, "Upload"),
    ),
    status,
    error,
    problemTable,
    h("h2", {}, "Uploaded"),
    h(
      "table",
      { id: "files" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["File", "Name", "Format", "Examples", "Size", "Uploaded", ""].map((c) => h("th", {}, c)),
        ),
      ),
      files,
    ),
    report,
  );
  refresh().catch((e) => e.name !== "AbortError" && error.show(e));
}

function fileRow(file, showReport) {
  return h(
    "tr",
    { "data-file": file.id },
    h("td", {}, h("code", {}, file.id)),
    h("td", { class: "filename" }, file.filename),
    h("td", {}, file.stats?.format ?? "—"),
    h("td", {}, file.stats?.examples ?? "—"),
    h("td", {}, bytes(file.bytes)),
    h("td", {}, time(file.created_at)),
    h("td", {}, h("button", { type: "button", class: "report", onclick: () => showReport(file) }, "Report")),
  );
}

/** The report's figures and its histogram of tokens per example (a <meter> a bar: no inline style). */
function reportParts(report) {
  const figures = [
    ["Base model", report.model],
    ["max_seq_length", report.max_seq_length],
    ["Examples", report.examples],
    ["Duplicate examples", report.duplicate_examples],
    ["Empty assistant turns", report.empty_assistant_turns],
  ];
  const tokens = report.tokens;
  if (!tokens) {
    figures.push(["Tokens", `not counted: ${report.tokens_unavailable}`]);
    return [figureList(figures)];
  }
  figures.push(
    ["Tokens per example", `min ${tokens.min}, median ${tokens.median}, p95 ${tokens.p95}, max ${tokens.max}`],
    ["Tokens in all", tokens.total],
    ["Trained tokens", report.trained_tokens],
    ["Truncated examples", `${report.truncated_examples} (${report.truncated_tokens} tokens cut)`],
    ["Dropped examples", report.dropped_examples],
  );
  const widest = Math.max(1, ...tokens.histogram.map((bin) => bin.count));
  const histogram = h(
    "table",
    { id: "token-histogram" },
    h("thead", {}, h("tr", {}, h("th", {}, "Tokens"), h("th", {}, "Examples"), h("th", {}, ""))),
    h(
      "tbody",
      {},
      tokens.histogram.map((bin) =>
        h(
          "tr",
          {},
          h("td", {}, `${bin.start}–${bin.end - 1}`),
          h("td", {}, bin.count),
          h("td", {}, h("meter", { min: 0, max: widest, value: bin.count })),
        ),
      ),
    ),
  );
  return [figureList(figures), h("h3", {}, "Tokens per example"), histogram];
}

function figureList(figures) {
  return h(
    "dl",
    { class: "report-figures" },
    figures.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]),
  );
}
