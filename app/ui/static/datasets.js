// Datasets: upload one (the server's line-by-line problems shown when it refuses the file) and list them.

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

  const refresh = async () => {
    const page = await get("/v1/files?limit=100&purpose=fine-tune", { signal });
    files.replaceChildren(...page.data.map(fileRow));
    if (!page.data.length)
      files.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No datasets yet.")));
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
          ["File", "Name", "Format", "Examples", "Size", "Uploaded"].map((c) => h("th", {}, c)),
        ),
      ),
      files,
    ),
  );
  refresh().catch((e) => e.name !== "AbortError" && error.show(e));
}

function fileRow(file) {
  return h(
    "tr",
    { "data-file": file.id },
    h("td", {}, h("code", {}, file.id)),
    h("td", { class: "filename" }, file.filename),
    h("td", {}, file.stats?.format ?? "—"),
    h("td", {}, file.stats?.examples ?? "—"),
    h("td", {}, bytes(file.bytes)),
    h("td", {}, time(file.created_at)),
  );
}
