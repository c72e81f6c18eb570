// experient's curation UI: one page, hash-routed, speaking only the JSON API.
// Everything the API returns is put on the page as text (never as HTML): experiences and
// model outputs are data a model or a user wrote.
"use strict";

const KEY = "experient.key";

// ---------- small DOM helpers ----------

/** h("tag.class#id", {attr: v, onclick: f}, child, ...): an element; strings become text. */
function h(spec, attrs, ...children) {
  const [, tag, rest] = /^([a-z0-9]+)(.*)$/.exec(spec);
  const el = document.createElement(tag);
  for (const m of rest.matchAll(/([.#])([\w-]+)/g)) {
    if (m[1] === ".") el.classList.add(m[2]); else el.id = m[2];
  }
  if (attrs !== undefined && attrs !== null && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.classList.add(...String(v).split(/\s+/).filter(Boolean));
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function $(sel, root = document) { return root.querySelector(sel); }
function main() { return $("#main"); }
function show(...nodes) { const m = main(); m.replaceChildren(); append(m, nodes); }

function when(iso) {
  if (!iso) return "";
  const d = typeof iso === "number" ? new Date(iso * 1000) : new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function enc(s) { return encodeURIComponent(s); }

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, type, message, param) {
    super(message);
    this.status = status; this.type = type; this.param = param;
  }
}

/** Calls the API with the stored key; an error envelope becomes an ApiError that says
 *  exactly what the server said. A 401 asks for the key and retries once. */
async function api(method, path, body, retried) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  let payload;
  if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  let r;
  try {
    r = await fetch(path, { method, headers, body: payload });
  } catch (e) {
    throw new ApiError(0, "network_error", "the server could not be reached: " + e.message, null);
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (r.status === 401 && !retried) {
    if (await askKey(data && data.error ? data.error.message : "this server needs a key")) {
      return api(method, path, body, true);
    }
  }
  if (!r.ok) {
    const e = data && data.error;
    throw new ApiError(r.status, e ? e.type : "http_error", e ? e.message : (text || r.statusText), e ? e.param : null);
  }
  return data;
}

/** Fetches an SVG (or any file) with the key and returns an object URL for an <img>. */
async function blobUrl(path) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  const r = await fetch(path, { headers });
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).error.message; } catch (_) { /* not an envelope */ }
    throw new ApiError(r.status, "http_error", msg, null);
  }
  return URL.createObjectURL(await r.blob());
}

// ---------- errors, confirmation, the key ----------

function report(e) {
  const box = $("#errors");
  const what = e instanceof ApiError
    ? `${e.status ? e.status + " " : ""}${e.type}: ${e.message}${e.param ? " (" + e.param + ")" : ""}`
    : String(e && e.message ? e.message : e);
  const item = h("div.error", h("span.msg", what),
    h("button.quiet", { type: "button", "aria-label": "dismiss", onclick: () => item.remove() }, "✕"));
  box.append(item);
  item.scrollIntoView({ block: "nearest" });
}

function clearErrors() { $("#errors").replaceChildren(); }

/** Runs an action from a button, reporting its failure; the button is disabled meanwhile. */
async function act(button, f) {
  if (button) button.disabled = true;
  try { return await f(); } catch (e) { report(e); return undefined; } finally { if (button) button.disabled = false; }
}

function confirmDialog(text) {
  const d = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "yes"), { once: true });
    d.returnValue = "";
    d.showModal();
    $("#confirm-no").focus();
  });
}

let keyWaiters = null;
function askKey(reason) {
  const d = $("#key-dialog");
  if (keyWaiters) return new Promise((r) => keyWaiters.push(r));
  keyWaiters = [];
  d.querySelector("p").textContent = reason + ". The key is kept for this browser tab only and sent with every API call.";
  $("#key-input").value = "";
  return new Promise((resolve) => {
    keyWaiters.push(resolve);
    d.addEventListener("close", () => {
      const v = $("#key-input").value.trim();
      const ok = d.returnValue !== "cancel" && v !== "";
      if (ok) sessionStorage.setItem(KEY, v);
      const ws = keyWaiters; keyWaiters = null;
      ws.forEach((w) => w(ok));
    }, { once: true });
    d.showModal();
    $("#key-input").focus();
  });
}

// ---------- routing ----------

const routes = [
  [/^#\/?$/, () => librariesPage()],
  [/^#\/jobs$/, () => jobsPage()],
  [/^#\/lib\/([^/]+)$/, (n) => experiencesPage(n)],
  [/^#\/lib\/([^/]+)\/proposals$/, (n) => proposalsPage(n)],
  [/^#\/lib\/([^/]+)\/versions$/, (n) => versionsPage(n)],
  [/^#\/lib\/([^/]+)\/learn$/, (n) => learnPage(n)],
  [/^#\/lib\/([^/]+)\/try$/, (n) => tryPage(n)],
  [/^#\/lib\/([^/]+)\/settings$/, (n) => settingsPage(n)],
  [/^#\/lib\/([^/]+)\/exp\/([^/]+)$/, (n, id) => provenancePage(n, id)],
];

let timers = [];
function every(ms, f) { const t = setInterval(f, ms); timers.push(t); }

async function route() {
  timers.forEach(clearInterval); timers = [];
  const hash = location.hash || "#/";
  document.querySelectorAll("[data-nav]").forEach((a) =>
    a.classList.toggle("active", (a.dataset.nav === "jobs") === hash.startsWith("#/jobs")));
  for (const [re, page] of routes) {
    const m = re.exec(hash);
    if (m) {
      try {
        await page(...m.slice(1).map(decodeURIComponent));
      } catch (e) {
        show(h("h1", "Could not load this page"), h("p.muted", "The server said:"));
        report(e);
      }
      return;
    }
  }
  show(h("h1", "Not found"), h("p", h("a", { href: "#/" }, "Back to the libraries")));
}

function go(hash) { if (location.hash === hash) route(); else location.hash = hash; }

// ---------- libraries ----------

async function librariesPage() {
  const list = await api("GET", "/v1/libraries");
  const name = h("input#new-lib-name", { type: "text", placeholder: "e.g. math-tips", pattern: "[A-Za-z0-9_.\\-]+", "aria-label": "new library name", required: true });
  const review = h("input#new-lib-review", { type: "checkbox" });
  const create = h("button#create-lib.primary", { type: "submit" }, "Create library");
  const form = h("form.row", {
    onsubmit: (ev) => {
      ev.preventDefault();
      act(create, async () => {
        const body = { name: name.value.trim() };
        if (review.checked) body.settings = { review: true };
        await api("POST", "/v1/libraries", body);
        go("#/lib/" + enc(body.name));
      });
    },
  }, h("label.grow", "New library", name), h("label", h("span", "Review learning"), review), create);
  const rows = list.data.map((l) => l.status === "damaged"
    ? h("tr", { "data-lib": l.name }, h("td", l.name), h("td", { colspan: 5 }, h("span.status-failed", "damaged: "), l.error))
    : h("tr", { "data-lib": l.name },
      h("td", h("a.lib-link", { href: "#/lib/" + enc(l.name) }, l.name)),
      h("td.num", l.experiences),
      h("td.num", l.version),
      h("td.hide-narrow", when(l.updated_at)),
      h("td", l.pending_proposals ? h("a", { href: `#/lib/${enc(l.name)}/proposals` }, `${l.pending_proposals} pending`) : h("span.muted", "—"),
        l.settings.review ? h("span.badge", { title: "learning is reviewed before it goes live" }, " review") : null),
      h("td.actions",
        h("button.danger.delete-lib", { type: "button", onclick: (ev) => deleteLibrary(ev.currentTarget, l.name) }, "Delete"))));
  show(
    h("h1", "Libraries"),
    h("div.panel", form),
    list.data.length
      ? h("table#libraries", h("thead", h("tr", h("th", "Name"), h("th", "Experiences"), h("th", "Version"), h("th.hide-narrow", "Last change"), h("th", "Proposals"), h("th", ""))), h("tbody", rows))
      : h("p.muted", "No libraries yet. Create one above, or learn one with ", h("code", "experient learn"), "."),
  );
  name.focus();
}

async function deleteLibrary(button, name) {
  if (!(await confirmDialog(`Delete the library '${name}' with all its versions? This cannot be undone.`))) return;
  await act(button, async () => { await api("DELETE", "/v1/libraries/" + enc(name)); route(); });
}

// ---------- one library: the frame ----------

async function libraryFrame(name, tab, ...content) {
  const lib = await api("GET", "/v1/libraries/" + enc(name));
  const t = (id, label, hash) => h("a", { href: hash, class: tab === id ? "active" : null, "data-tab": id }, label);
  const base = "#/lib/" + enc(name);
  show(
    h("div.crumbs", h("a", { href: "#/" }, "Libraries"), " / "),
    h("h1", name, " ", h("span.muted", `v${lib.version} · ${plural(lib.experiences, "experience")}`)),
    lib.canary ? canaryBanner(name, lib.canary) : null,
    h("nav.tabs", { "aria-label": "library" },
      t("experiences", "Experiences", base),
      t("proposals", `Proposals${lib.pending_proposals ? " (" + lib.pending_proposals + ")" : ""}`, base + "/proposals"),
      t("versions", "Versions", base + "/versions"),
      t("learn", "Learn", base + "/learn"),
      t("try", "Try it", base + "/try"),
      t("settings", "Settings", base + "/settings")),
    ...content,
  );
  return lib;
}

// A running live trial: what is on trial, on what share of traffic, each arm's feedback so far,
// and a way to stop it (the live version stays).
function canaryBanner(name, c) {
  const what = c.candidate.version !== undefined && c.candidate.version !== null
    ? `v${c.candidate.version}` : plural(c.candidate.proposals.length, "proposal") + ` on v${c.base}`;
  const arm = (t) => t.n ? `${t.mean.toFixed(3)} (n = ${t.n})` : "no feedback yet";
  const stop = h("button.danger#stop-canary", { type: "button" }, "Stop trial");
  stop.addEventListener("click", async () => {
    if (!(await confirmDialog("Stop the trial? Everyone gets the live version again."))) return;
    await act(stop, async () => { await api("DELETE", `/v1/libraries/${enc(name)}/canary`); route(); });
  });
  return h("div.panel.canary#canary", { "data-canary": c.id },
    h("div.row", h("strong", "Live trial: "), `${what} serves ${Math.round(c.share * 100)}% of traffic. `,
      `Feedback: candidate ${arm(c.trial)}, live ${arm(c.control)}. `,
      h("span.muted", `First look at ${c.next_look} per arm; ends by ${when(c.deadline)}.`), h("span.spacer"), stop));
}

// Starts a live trial of `candidate` ({version} or {proposals}) on a share the curator picks.
async function startCanary(button, name, candidate) {
  const d = $("#canary-dialog");
  $("#canary-what").textContent = candidate.version !== undefined
    ? `Serve v${candidate.version} to a share of this library's traffic.`
    : `Serve the live version with ${plural(candidate.proposals.length, "selected proposal")} to a share of this library's traffic.`;
  const go = await new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "yes"), { once: true });
    d.returnValue = "";
    d.showModal();
    $("#canary-share").focus();
  });
  if (!go) return;
  const spec = { ...candidate, share: Number($("#canary-share").value) / 100, min_samples: Number($("#canary-min").value) };
  await act(button, async () => { await api("POST", `/v1/libraries/${enc(name)}/canary`, spec); route(); });
}

// ---------- experiences ----------

async function experiencesPage(name) {
  const search = h("input#search", { type: "search", placeholder: "Search (BM25)…  press / to focus", "aria-label": "search experiences" });
  const tag = h("select#tag-filter", { "aria-label": "filter by tag" }, h("option", { value: "" }, "all tags"));
  const sort = h("select#sort", { "aria-label": "sort" },
    h("option", { value: "id" }, "oldest first"), h("option", { value: "uses" }, "most used"), h("option", { value: "updated" }, "recently changed"));
  const tableBox = h("div#experience-list");
  const text = h("textarea#new-text", { placeholder: "Name: what to do, and when.  (Ctrl+Enter adds)", "aria-label": "new experience text" });
  const tags = h("input#new-tags", { type: "text", placeholder: "tags, comma separated", "aria-label": "new experience tags" });
  const propose = h("input#new-propose", { type: "checkbox" });
  const add = h("button#add-exp.primary", { type: "button" }, "Add experience");
  const addIt = () => act(add, async () => {
    const body = { text: text.value, tags: splitTags(tags.value) };
    const path = `/v1/libraries/${enc(name)}/experiences${propose.checked ? "?review=true" : ""}`;
    const r = await api("POST", path, body);
    text.value = ""; tags.value = "";
    if (r.object === "library.proposal") go(`#/lib/${enc(name)}/proposals`); else await refresh(true);
  });
  add.addEventListener("click", addIt);
  text.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) addIt(); });

  let all = [];
  async function refresh(reloadFrame) {
    if (reloadFrame) { await experiencesPage(name); return; }
    const q = search.value.trim();
    const params = new URLSearchParams({ limit: "10000" });
    if (q) params.set("q", q);
    if (tag.value) params.set("tag", tag.value);
    const r = await api("GET", `/v1/libraries/${enc(name)}/experiences?${params}`);
    let rows = r.data;
    if (!q) {
      if (sort.value === "uses") rows = rows.slice().sort((a, b) => b.uses - a.uses);
      if (sort.value === "updated") rows = rows.slice().sort((a, b) => b.updated.localeCompare(a.updated));
    }
    sort.disabled = !!q;
    tableBox.replaceChildren(experienceTable(name, rows, !!q, () => refresh(true)));
  }
  await libraryFrame(name, "experiences",
    h("div.panel", h("div.row", h("label.grow", "Search", search), h("label", "Tag", tag), h("label", "Sort", sort))),
    tableBox,
    h("h2", "Add an experience"),
    h("div.panel", text, h("div.row", { class: "mt" }, h("label.grow", "Tags", tags),
      h("label", h("span", "Propose for review"), propose), add)),
  );
  const first = await api("GET", `/v1/libraries/${enc(name)}/experiences?limit=10000`);
  all = first.data;
  const tagSet = [...new Set(all.flatMap((e) => e.tags))].sort();
  tagSet.forEach((t) => tag.append(h("option", { value: t }, t)));
  let debounce;
  search.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(() => refresh().catch(report), 200); });
  tag.addEventListener("change", () => refresh().catch(report));
  sort.addEventListener("change", () => refresh().catch(report));
  await refresh();
}

function splitTags(s) { return s.split(/[,\s]+/).map((t) => t.trim()).filter(Boolean); }

function experienceTable(name, rows, ranked, changed) {
  if (!rows.length) return h("p.muted#no-experiences", ranked ? "Nothing matches." : "This library is empty.");
  return h("table#experiences",
    h("thead", h("tr", h("th", "Id"), h("th", "Experience"), h("th.hide-narrow", "Tags"), h("th", "Source"),
      h("th.num", ranked ? "Score" : "Uses"), h("th.num", { title: "feedback on answers it was in, since its text was last set" }, "Feedback"),
      h("th.hide-narrow", "Updated"), h("th", ""))),
    h("tbody", rows.map((e) => experienceRow(name, e, ranked, changed))));
}

function experienceRow(name, e, ranked, changed) {
  const textCell = h("td.text", e.text);
  const tagsCell = h("td.hide-narrow", e.tags.map((t) => h("span.tag", t)));
  const edit = h("button.edit", { type: "button" }, "Edit");
  const del = h("button.danger.delete", { type: "button" }, "Delete");
  const row = h("tr", { "data-id": e.id },
    h("td.id", h("a.prov-link", { href: `#/lib/${enc(name)}/exp/${enc(e.id)}`, title: "where it came from" }, e.id)),
    textCell, tagsCell,
    h("td", h(`span.badge.${e.source}`, e.source)),
    h("td.num", ranked ? (e.score || 0).toFixed(2) : e.uses),
    h("td.num.credit", { title: `all time: ${e.helpful} helpful, ${e.harmful} harmful` }, `+${e.credit.helpful} −${e.credit.harmful}`),
    h("td.hide-narrow", when(e.updated)),
    h("td.actions", edit, del));
  edit.addEventListener("click", () => {
    const ta = h("textarea.edit-text", { "aria-label": "experience text", value: e.text });
    const tg = h("input.edit-tags", { type: "text", "aria-label": "tags", value: e.tags.join(", ") });
    const save = h("button.primary.save", { type: "button" }, "Save");
    const cancel = h("button.quiet.cancel", { type: "button" }, "Cancel");
    const doSave = () => act(save, async () => {
      await api("PATCH", `/v1/libraries/${enc(name)}/experiences/${enc(e.id)}`, { text: ta.value, tags: splitTags(tg.value) });
      await changed();
    });
    save.addEventListener("click", doSave);
    cancel.addEventListener("click", () => row.replaceWith(experienceRow(name, e, ranked, changed)));
    ta.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) doSave();
      if (ev.key === "Escape") cancel.click();
    });
    textCell.replaceChildren(ta);
    tagsCell.replaceChildren(tg);
    row.querySelector("td.actions").replaceChildren(save, cancel);
    ta.focus();
  });
  del.addEventListener("click", async () => {
    if (!(await confirmDialog(`Delete ${e.id}? A rollback can bring it back.`))) return;
    await act(del, async () => { await api("DELETE", `/v1/libraries/${enc(name)}/experiences/${enc(e.id)}`); await changed(); });
  });
  return row;
}

// ---------- provenance ----------

async function provenancePage(name, id) {
  const p = await api("GET", `/v1/libraries/${enc(name)}/experiences/${enc(id)}/provenance`);
  const e = p.experience;
  const origin = {
    learned: "Learned by Training-Free GRPO",
    manual: "Added by hand",
    imported: "Imported",
  }[p.source] || p.source;
  const facts = h("div.panel#provenance",
    h("div.change", e ? e.text : h("span.muted", "(deleted; its last text is in the history below)")),
    h("p", h(`span.badge.${p.source}`, p.source), " ", origin,
      p.provenance.run ? [" in run ", h("code", p.provenance.run), ", step ", p.provenance.step] : null,
      p.provenance.note ? [" — ", p.provenance.note] : null),
    h("p", "Injected into ", h("strong#uses", p.uses), p.uses === 1 ? " request." : " requests."),
    p.provenance.sources && p.provenance.sources.length
      ? h("p", "Learned from recorded traffic: ", p.provenance.sources.map((s) => h("code", s, " "))) : null,
    p.run_records_missing ? h("p.muted", "The run's records are no longer on this server, so its evidence cannot be shown.") : null);
  await libraryFrame(name, "experiences",
    h("h2", `Provenance of ${id}`), facts,
    h("h2", "History"),
    h("ol.timeline#history", p.versions.map((v) => h("li", { "data-version": v.version },
      h("div", h("strong", `v${v.version}`), " ", opLine(v.op)),
      h("div.meta", when(v.at), " · ", v.message,
        v.proposal ? [" · ", v.proposal.id, v.proposal.decision && v.proposal.decision.edited ? " edited in review" : " as proposed"] : null)))),
    p.learned ? [h("h2", "What it was learned from"), evidenceView(p.learned, true)] : null,
  );
}

function opLine(op) {
  switch (op.op) {
    case "add": return [h("span.op.op-add", "ADD"), op.text];
    case "update": return [h("span.op.op-update", "UPDATE"), op.text || "", op.tags ? [" tags: ", op.tags.join(", ")] : ""];
    case "delete": return [h("span.op.op-delete", "DELETE")];
    case "restore": return [h("span.op.op-add", "RESTORE"), op.experience.text];
    default: return [op.op];
  }
}

function rewards(rs) {
  return h("span.rewards", (rs || []).map((r) => h(r > 0 ? "span.r-good" : "span.r-bad", Number(r).toFixed(2))));
}

/** The run's evidence for a learned change: each group's task, attempts and rewards, the
 *  learner's comparison and operations, and how the step merged them. */
function evidenceView(ev, full) {
  const groups = ev.groups.map((g) => h("div.panel.group", { "data-task": g.task },
    h("h3", g.produced ? "Proposed it: " : "Contributed to the step: ", "task ", g.task),
    h("p", h("strong", "Question: "), g.question),
    h("p", h("strong", "Reference answer: "), g.answer, "   ", h("strong", "Rewards: "), rewards(g.rewards)),
    full && g.attempts ? h("details", h("summary", `The group's ${g.attempts.length} attempts`),
      g.attempts.map((a) => h("div", h("p", "Attempt ", a.attempt, " — reward ", rewards([a.reward]), a.error ? [" — failed: ", a.error] : ""),
        h("pre", a.output), a.critique ? h("p.muted", "Judge: ", a.critique) : null))) : null,
    g.comparison ? h("details", { open: !full || null }, h("summary", "The learner's comparison of the attempts"), h("pre", g.comparison)) : null,
    g.lessons ? h("p", h("strong", "Lessons: "), g.lessons) : null,
    g.proposals && g.proposals.length ? h("p", h("strong", "Operations it proposed: "), g.proposals.map((o) => h("div", opLine(o)))) : null));
  const c = ev.consolidation;
  return h("div.evidence",
    h("p.muted", `Run ${ev.run}, step ${ev.step} · tasks: ${ev.dataset === "inline" ? "given in the request" : ev.dataset} · model: ${ev.model || "?"} · verifier: ${ev.verifier || "?"}`),
    groups.length ? groups : h("p.muted", "No group of this step proposed anything."),
    c ? h("details", h("summary", "How the step's proposals were merged"), c.fallback ? h("p", "Fallback: ", c.fallback) : null,
      c.reply ? h("pre", c.reply) : null,
      h("div", (c.result || []).map((o) => h("div", opLine(o))))) : null);
}

// ---------- proposals ----------

let proposalStatus = "pending";

async function proposalsPage(name) {
  const list = await api("GET", `/v1/libraries/${enc(name)}/proposals?status=${proposalStatus}`);
  const status = h("select#proposal-status", { "aria-label": "show" },
    ["pending", "approved", "rejected", "all"].map((v) => h("option", { value: v }, v)));
  status.value = proposalStatus;
  status.addEventListener("change", () => { proposalStatus = status.value; route(); });
  const reviewer = h("input#reviewer", { type: "text", placeholder: "your name (recorded with the decision)", value: localStorage.getItem("experient.reviewer") || "" });
  reviewer.addEventListener("change", () => localStorage.setItem("experient.reviewer", reviewer.value));
  const approveSel = h("button#approve-selected.primary", { type: "button", disabled: true }, "Approve selected as one version");
  const trySel = h("button#try-selected", { type: "button", disabled: true }, "Try selected on live traffic");
  const cards = list.data.map((p) => proposalCard(name, p, reviewer, () => {
    approveSel.disabled = trySel.disabled = !document.querySelector("input.select:checked");
  }));
  trySel.addEventListener("click", () => startCanary(trySel, name,
    { proposals: [...document.querySelectorAll("input.select:checked")].map((c) => c.value) }));
  approveSel.addEventListener("click", () => act(approveSel, async () => {
    const ids = [...document.querySelectorAll("input.select:checked")].map((c) => c.value);
    const edits = {};
    for (const id of ids) {
      const ta = document.querySelector(`[data-proposal="${id}"] textarea.proposal-text`);
      if (ta && ta.value !== ta.defaultValue) edits[id] = { text: ta.value };
    }
    await api("POST", `/v1/libraries/${enc(name)}/proposals/approve`, { ids, edits, reviewer: reviewer.value || undefined });
    route();
  }));
  await libraryFrame(name, "proposals",
    h("div.panel", h("div.row", h("label", "Show", status), h("label.grow", "Reviewer", reviewer), trySel, approveSel)),
    list.data.length ? h("div.cards#proposals", cards)
      : h("p.muted#no-proposals", proposalStatus !== "pending" ? `No ${proposalStatus} proposals.` : "Nothing waits for review. With the library's ", h("a", { href: `#/lib/${enc(name)}/settings` }, "review setting"), " on, what learning proposes lands here first."));
}

function proposalCard(name, p, reviewer, selectionChanged) {
  const c = p.change;
  const editable = c.op !== "delete";
  const ta = editable ? h("textarea.proposal-text", { "aria-label": "proposed text", value: c.text || "" }) : null;
  if (ta) ta.defaultValue = c.text || "";
  const approve = h("button.primary.approve", { type: "button" }, "Approve");
  const reject = h("button.danger.reject", { type: "button" }, "Reject");
  const select = h("input.select", { type: "checkbox", value: p.id, "aria-label": "select " + p.id, onchange: selectionChanged });
  approve.addEventListener("click", () => act(approve, async () => {
    const body = { reviewer: reviewer.value || undefined };
    if (ta && ta.value !== ta.defaultValue) body.text = ta.value;
    await api("POST", `/v1/libraries/${enc(name)}/proposals/${enc(p.id)}/approve`, body);
    route();
  }));
  reject.addEventListener("click", () => act(reject, async () => {
    await api("POST", `/v1/libraries/${enc(name)}/proposals/${enc(p.id)}/reject`, { reviewer: reviewer.value || undefined });
    route();
  }));
  const head = { add: "ADD", update: `UPDATE ${c.id}`, delete: `DELETE ${c.id}` }[c.op];
  return h("div.panel.proposal", { "data-proposal": p.id },
    h("div.row", h("label", select), h("strong", p.id), h(`span.op.op-${c.op}`, head),
      h("span.muted", p.origin.kind === "learned" ? `learned in ${p.origin.run}, step ${p.origin.step}` : "asked for by an API write"),
      h("span.spacer")),
    p.current ? h("div.diff", h("div.diff-id", "now / proposed"), h("div.before", p.current.text), h("div.after", c.op === "delete" ? h("em", "deleted") : c.text || p.current.text)) : null,
    editable ? h("div", { class: "mt" }, ta) : null,
    p.origin.gate ? gateView(p.origin.gate) : null,
    p.evidence ? h("details.evidence-box", h("summary", "Evidence"), evidenceView(p.evidence, false)) : null,
    p.status !== "pending" ? h("p", h("strong", p.status), p.decision && p.decision.reviewer ? " by " + p.decision.reviewer : "") :
      h("div.actions", reject, approve));
}

// The gate's measurement of a learned candidate against its parent: both accuracies, the
// difference with its interval, and the tasks on which they disagree.
function gateView(g) {
  if (!g.outcome && g.canary) return h("p.gate", "Live trial: ", g.canary.decision);
  const c = g.comparison;
  const f = (x) => (x >= 0 ? "+" : "") + x.toFixed(3);
  const figures = c ? h("dl.gate-figures",
    h("dt", "parent (" + c.baseline_label + ")"), h("dd", `${c.baseline.mean.toFixed(3)} [${c.baseline.ci[0].toFixed(3)}, ${c.baseline.ci[1].toFixed(3)}]`),
    h("dt", c.candidate_label), h("dd", `${c.candidate.mean.toFixed(3)} [${c.candidate.ci[0].toFixed(3)}, ${c.candidate.ci[1].toFixed(3)}]`),
    h("dt", "difference"), h("dd", `${f(c.difference)} [${f(c.difference_ci[0])}, ${f(c.difference_ci[1])}], p = ${c.p_value.toFixed(3)}, ${c.n} tasks`),
    h("dt", "cost"), h("dd", `${c.cost.model_calls} calls, ${c.cost.prompt_tokens + c.cost.completion_tokens} tokens, ${c.cost.wall_secs.toFixed(1)} s`)) : null;
  const tasks = c && c.disagreements.length ? h("details", h("summary", `${c.disagree.length} tasks where they disagree`),
    h("ul", c.disagreements.map((d) => h("li", `${d.baseline} → ${d.candidate}: ${d.question}`)))) : null;
  return h("div.gate", { "data-gate": g.outcome }, h("p", h(`span.badge.gate-${g.outcome}`, "gate: " + g.outcome), " ", g.reason), figures, tasks);
}

// ---------- versions ----------

async function versionsPage(name) {
  const vs = (await api("GET", `/v1/libraries/${enc(name)}/versions`)).data;
  const latest = vs.length ? vs[vs.length - 1].version : 0;
  const opt = (v) => h("option", { value: v.version }, `v${v.version} — ${v.message}`);
  const from = h("select#diff-from", { "aria-label": "from version" }, vs.map(opt));
  const to = h("select#diff-to", { "aria-label": "to version" }, vs.map(opt));
  from.value = String(Math.max(0, latest - 1)); to.value = String(latest);
  const out = h("div#diff");
  const showDiff = h("button#show-diff", { type: "button" }, "Compare");
  const compare = () => act(showDiff, async () => {
    const d = await api("GET", `/v1/libraries/${enc(name)}/diff?from=${from.value}&to=${to.value}`);
    out.replaceChildren(diffView(d));
  });
  showDiff.addEventListener("click", compare);
  const items = vs.slice().reverse().map((v) => h("li", { "data-version": v.version },
    h("div", h("strong", `v${v.version}`), " ", v.message),
    h("div.meta", when(v.at), ` · +${v.added} ~${v.updated} −${v.deleted}`,
      v.review ? [" · reviewed", v.review.reviewer ? " by " + v.review.reviewer : ""] : "",
      v.gate && v.gate.outcome ? ` · gate: ${v.gate.outcome}` : ""),
    v.gate && v.gate.outcome ? h("details", h("summary", "How it measured against its parent"), gateView(v.gate)) : null,
    v.gate && v.gate.canary ? h("p.muted", "Live trial: ", v.gate.canary.decision) : null,
    v.version !== latest ? h("div.row",
      h("button.rollback", { type: "button", onclick: (ev) => rollback(ev.currentTarget, name, v.version) }, `Roll back to v${v.version}`),
      h("button.try-version", { type: "button", onclick: (ev) => startCanary(ev.currentTarget, name, { version: v.version }) }, "Try on live traffic"))
      : h("span.muted", "current")));
  await libraryFrame(name, "versions",
    h("div.split",
      h("div", h("h2", "Timeline"), h("ol.timeline#versions", items)),
      h("div", h("h2", "Compare two versions"), h("div.panel", h("div.row", h("label", "From", from), h("label", "To", to), showDiff)), out)));
  if (vs.length > 1) compare();
}

function diffView(d) {
  const total = d.added.length + d.removed.length + d.changed.length;
  if (!total) return h("p.muted", `No difference between v${d.from} and v${d.to}.`);
  const pair = (id, before, after) => [h("div.diff-id", id), before === null ? h("div.empty", "absent") : h("div.before", before),
    after === null ? h("div.empty", "absent") : h("div.after", after)];
  return h("div",
    h("p", `v${d.from} → v${d.to}: ${d.added.length} added, ${d.removed.length} removed, ${d.changed.length} changed.`),
    h("div.diff", d.added.map((e) => pair(e.id + " added", null, e.text)),
      d.removed.map((e) => pair(e.id + " removed", e.text, null)),
      d.changed.map((c) => pair(c.id + " changed", c.before.text, c.after.text))));
}

async function rollback(button, name, version) {
  if (!(await confirmDialog(`Make a new version equal to v${version}?`))) return;
  await act(button, async () => { await api("POST", `/v1/libraries/${enc(name)}/rollback`, { version }); route(); });
}

// ---------- learning ----------

async function learnPage(name) {
  const models = (await api("GET", "/v1/models")).data.map((m) => m.id).filter((id) => !id.includes(":") && !id.includes("@"));
  const model = h("select#learn-model", { "aria-label": "model" }, models.map((m) => h("option", { value: m }, m)));
  const tasks = h("textarea#tasks.code", { rows: 6, placeholder: '{"question": "What is 2+3?", "answer": "5"}\n{"question": "...", "answer": "..."}' });
  const file = h("input#tasks-file", { type: "file", accept: ".jsonl,.json,.txt" });
  file.addEventListener("change", async () => { if (file.files[0]) tasks.value = await file.files[0].text(); });
  const num = (id, v, label) => h("label", label, h(`input#${id}`, { type: "number", min: 1, value: v, class: "narrow" }));
  const verifier = h("select#verifier", { "aria-label": "verifier" }, ["numeric", "exact", "judge"].map((v) => h("option", { value: v }, v)));
  const options = h("textarea#learn-options.code", { rows: 2, placeholder: '{"temperature": 1.0, "max_tokens": 256, "learner_model": "...", "validation": [...]}' });
  const start = h("button#start-job.primary", { type: "button" }, "Start learning");
  start.addEventListener("click", () => act(start, async () => {
    const list = parseTasks(tasks.value);
    const body = { tasks: list, model: model.value, verifier: verifier.value };
    for (const k of ["group_size", "epochs", "batch_size"]) body[k] = Number($("#" + k).value);
    const extra = options.value.trim();
    if (extra) {
      let o;
      try { o = JSON.parse(extra); } catch (e) { throw new Error("the options are not JSON: " + e.message); }
      if (!o || typeof o !== "object" || Array.isArray(o)) throw new Error("the options must be a JSON object");
      Object.assign(body, o);
    }
    await api("POST", `/v1/libraries/${enc(name)}/learn`, body);
    await refreshJobs();
  }));
  const jobsBox = h("div#jobs-box");
  async function refreshJobs() {
    const jobs = (await api("GET", "/v1/jobs")).data.filter((j) => j.library === name).reverse();
    jobsBox.replaceChildren(jobsTable(jobs, refreshJobs));
  }
  await libraryFrame(name, "learn",
    h("div.panel",
      h("p.muted", "Tasks with known answers, one JSON object per line (", h("code", "question"), ", ", h("code", "answer"), "). Each step samples a group of answers per task, compares winners with losers, and turns what separated them into experiences."),
      tasks, h("div.row", { class: "mt" }, h("label", "or a file", file), h("label", "Model", model), h("label", "Verifier", verifier),
        num("group_size", 4, "Group size"), num("epochs", 1, "Epochs"), num("batch_size", 4, "Batch size"), start),
      h("details", h("summary", "More options (JSON, any field of a learn request)"), options)),
    h("h2", "Jobs"), jobsBox);
  await refreshJobs();
  every(1500, () => refreshJobs().catch(report));
}

function parseTasks(text) {
  const t = text.trim();
  if (!t) throw new Error("give at least one task: {\"question\": ..., \"answer\": ...} per line");
  if (t.startsWith("[")) return JSON.parse(t);
  return t.split("\n").filter((l) => l.trim()).map((l, i) => {
    try { return JSON.parse(l); } catch (e) { throw new Error(`line ${i + 1} is not JSON: ${e.message}`); }
  });
}

function jobsTable(jobs, changed) {
  if (!jobs.length) return h("p.muted#no-jobs", "No learning jobs since the server started.");
  return h("table#jobs", h("thead", h("tr", h("th", "Job"), h("th", "Library"), h("th", "Status"), h("th", "Progress"), h("th", "Chart"), h("th", ""))),
    h("tbody", jobs.map((j) => jobRow(j, changed))));
}

const charts = new Map();

function jobRow(j, changed) {
  const p = j.progress || {};
  const cancel = j.status === "running"
    ? h("button.danger.cancel-job", { type: "button", onclick: (ev) => act(ev.currentTarget, async () => { await api("DELETE", "/v1/jobs/" + enc(j.id)); await changed(); }) }, "Cancel")
    : null;
  const chart = h("td.chart-cell");
  const drawn = (u) => chart.replaceChildren(h("a", { href: u, target: "_blank" }, h("img.chart", { src: u, alt: "the run's chart", width: 260 })));
  // Charts are fetched again only when the job has moved on, not on every poll.
  const key = `${j.status}:${p.step || 0}`;
  const cached = charts.get(j.id);
  if (cached && cached.key === key) drawn(cached.url);
  else if (p.step || j.status !== "running") {
    blobUrl(`/v1/jobs/${enc(j.id)}/chart.svg`).then((u) => {
      if (cached) URL.revokeObjectURL(cached.url);
      charts.set(j.id, { key, url: u });
      drawn(u);
    }).catch(report);
  }
  const res = j.result;
  return h("tr", { "data-job": j.id },
    h("td.id", j.id.slice(0, 12) + "…", h("div.muted", when(j.created_at))),
    h("td", h("a", { href: "#/lib/" + enc(j.library) }, j.library)),
    h("td", h(`span.status.status-${j.status}`, j.status), j.error ? h("div.muted", j.error) : null),
    h("td", h("progress", { max: p.steps || 1, value: p.step || 0 }), " ", `step ${p.step || 0}/${p.steps || "?"}`,
      p.phase ? h("div.muted", p.phase) : null,
      res ? h("div.muted", `library v${res.version}, ${res.experiences} experiences`) : null,
      res && res.cost ? h("div.muted.job-cost", costLine(res.cost)) : null),
    chart,
    h("td.actions", cancel));
}

// What a learning run cost, in one line.
function costLine(c) {
  const tokens = c.prompt_tokens + c.completion_tokens;
  return `cost: ${c.rollouts} attempts, ${c.model_calls} model calls, ${tokens} tokens, ${c.wall_secs.toFixed(1)} s` +
    (c.price !== undefined ? `, ${c.price.toFixed(4)} in the upstream's currency` : "");
}

async function jobsPage() {
  const box = h("div#jobs-box");
  const refresh = async () => {
    const jobs = (await api("GET", "/v1/jobs")).data.slice().reverse();
    box.replaceChildren(jobsTable(jobs, refresh));
  };
  show(h("h1", "Learning jobs"), box);
  await refresh();
  every(1500, () => refresh().catch(report));
}

// ---------- try it ----------

async function tryPage(name) {
  const models = (await api("GET", "/v1/models")).data.map((m) => m.id).filter((id) => !id.includes(":") && !id.includes("@"));
  const model = h("select#try-model", { "aria-label": "model" }, models.map((m) => h("option", { value: m }, m)));
  const prompt = h("textarea#try-prompt", { placeholder: "Ask something the library should help with.  (Ctrl+Enter sends)", "aria-label": "prompt" });
  const maxTokens = h("input#try-max-tokens", { type: "number", min: 1, value: 128, class: "narrow" });
  const send = h("button#try-send.primary", { type: "button" }, "Send to both");
  const without = h("div.panel.answer#try-without", h("span.muted", "—"));
  const withLib = h("div.panel.answer#try-with", h("span.muted", "—"));
  const used = h("div#try-used");
  const ask = (m) => api("POST", "/v1/chat/completions", {
    model: m, messages: [{ role: "user", content: prompt.value }], max_tokens: Number(maxTokens.value), temperature: 0,
  });
  const go = () => act(send, async () => {
    without.replaceChildren(h("span.muted", "…")); withLib.replaceChildren(h("span.muted", "…")); used.replaceChildren();
    const [a, b] = await Promise.allSettled([ask(model.value), ask(`${model.value}@${name}`)]);
    const fill = (box, r) => {
      if (r.status === "rejected") { box.replaceChildren(h("span.status-failed", r.reason.message)); report(r.reason); return; }
      box.replaceChildren(r.value.choices[0].message.content || "");
    };
    fill(without, a); fill(withLib, b);
    if (b.status === "fulfilled") {
      const ids = (b.value.experient && b.value.experient.experiences) || [];
      const lib = await api("GET", `/v1/libraries/${enc(name)}/experiences?limit=10000`);
      const byId = new Map(lib.data.map((e) => [e.id, e]));
      used.replaceChildren(h("h2", `Experiences used (${ids.length})`),
        ids.length ? h("ul", ids.map((id) => h("li", { "data-id": id }, h("a", { href: `#/lib/${enc(name)}/exp/${enc(id)}` }, id), " ", byId.get(id) ? byId.get(id).text : "")))
          : h("p.muted", "None: the library is empty or nothing matched."));
    }
  });
  send.addEventListener("click", go);
  prompt.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) go(); });
  await libraryFrame(name, "try",
    h("div.panel", prompt, h("div.row", { class: "mt" }, h("label", "Model", model), h("label", "Max tokens", maxTokens), send)),
    h("div.split", h("div", h("h2", "Without the library"), without), h("div", h("h2", `With ${name}`), withLib)),
    used);
  prompt.focus();
}

// ---------- settings ----------

async function settingsPage(name) {
  const lib = await libraryFrame(name, "settings");
  const s = lib.settings;
  const inject = h("select#inject", { "aria-label": "inject" }, h("option", { value: "auto" }, "all while small, else the top_k most relevant"), h("option", { value: "all" }, "all experiences"), h("option", { value: "top_k" }, "the top_k most relevant"));
  inject.value = s.inject;
  const topK = h("input#top-k", { type: "number", min: 1, value: s.top_k, class: "narrow" });
  const review = h("input#review", { type: "checkbox", checked: s.review });
  const record = h("input#record", { type: "checkbox", checked: s.record });
  const save = h("button#save-settings.primary", { type: "button" }, "Save settings");
  const saved = h("div#settings-saved");
  save.addEventListener("click", () => act(save, async () => {
    const body = { ...s, inject: inject.value, top_k: Number(topK.value), review: review.checked, record: record.checked };
    await api("PATCH", "/v1/libraries/" + enc(name), body);
    saved.replaceChildren(h("div.notice", "Saved."));
  }));
  append(main(), [h("div.panel#settings",
    h("div.row", h("label", "Inject", inject), h("label", "top_k", topK)),
    h("p", h("label", review, " Review: what learning proposes waits for a person's approval before it is injected anywhere")),
    h("p", h("label", record, " Record completions served with this library, so feedback can be given on them and learned from")),
    h("div.actions", save), saved)]);
}

// ---------- start ----------

document.addEventListener("keydown", (ev) => {
  if (ev.key === "/" && !/^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName)) {
    const s = $("#search");
    if (s) { ev.preventDefault(); s.focus(); }
  }
});

window.addEventListener("hashchange", () => { clearErrors(); route(); });
window.addEventListener("DOMContentLoaded", () => {
  $("#key-button").addEventListener("click", () => askKey("Set the admin key this tab sends").then((ok) => ok && route()));
  $("#key-clear").addEventListener("click", () => { sessionStorage.removeItem(KEY); $("#key-dialog").close("cancel"); });
  route();
});
