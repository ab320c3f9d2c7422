// The researchers' page: a client of the public REST and WebSocket API, nothing more.
// Every value from the server reaches the page through textContent or attributes, never
// as markup. The session cookie is HttpOnly; state-changing calls carry the CSRF token
// the server rendered into the page.
"use strict";

const CSRF = document.querySelector('meta[name="uws-csrf"]')?.content || "";
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function flash(message, kind = "error") {
  const box = $("#flash");
  box.textContent = message;
  box.className = `flash ${kind}`;
  box.hidden = false;
}

class ApiRefusal extends Error {}

// One call to the API: the envelope's message becomes the error a refusal shows.
async function api(method, path, body) {
  const headers = { "X-UWS-CSRF": CSRF };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  if (response.status === 401) {
    location.assign("/ui/");
    throw new ApiRefusal("Your sign-in has ended.");
  }
  let data = {};
  try { data = await response.json(); } catch { /* an empty or non-JSON answer */ }
  if (!response.ok || data.success === false) {
    throw new ApiRefusal(data.message || `The server answered ${response.status}.`);
  }
  return data;
}

// Run an action, showing the server's refusal on the page instead of failing silently.
async function attempt(action) {
  try { return await action(); } catch (err) {
    flash(err instanceof ApiRefusal ? err.message : `Something went wrong: ${err.message}`);
    return undefined;
  }
}

// A status socket that reconnects (with backoff) when the connection drops.
function watch(path, onEvent) {
  let delay = 500;
  const open = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}${path}`);
    socket.onopen = () => { delay = 500; };
    socket.onmessage = (message) => onEvent(JSON.parse(message.data));
    socket.onclose = (closed) => {
      if (closed.code === 4401) { location.assign("/ui/"); return; }
      if (closed.code === 4404) return;
      setTimeout(open, delay);
      delay = Math.min(delay * 2, 15000);
    };
  };
  open();
}

function debounce(fn, ms = 250) {
  let timer;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = n, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}`, text: status });
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}`;
}

// Upload, then wait (briefly) for the server's rescan to list the new files: the
// workspace's file list is what is really on disk, and it is read in the background.
async function uploadFiles(workspaceId, fileList) {
  if (!fileList.length) return;
  const form = new FormData();
  [...fileList].forEach((file, i) => form.append(`file${i}`, file, file.name));
  await api("PUT", `/workspaces/${workspaceId}/upload/`, form);
  const wanted = [...fileList].map((f) => `/${f.name}`);
  for (let i = 0; i < 40; i += 1) {
    const { data } = await api("GET", `/workspaces/${workspaceId}/`);
    const listed = new Set((data.workspaces[0]?.workspace_details?.current_workspace_details?.files || [])
      .map((f) => f.name));
    if (wanted.every((name) => listed.has(name))) return;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

// --- the home page ----------------------------------------------------------------------

async function loadQuota(target = "#quota") {
  const { data } = await api("GET", "/users/me/quota/");
  const q = data.quota;
  const limit = (v, fmt) => (v === null || v === undefined ? "unlimited" : fmt(v));
  const hours = (v) => `${Number(v).toFixed(2)} h`;
  $(target).replaceChildren(
    el("dt", { text: "Disk" }),
    el("dd", { id: "quota-disk", text: `${bytes(q.used_disk_space)} used, ${bytes(q.reserved_disk_space)} reserved, of ${limit(q.max_disk_space, bytes)}` }),
    el("dt", { text: "Core-hours" }),
    el("dd", { id: "quota-hours", text: `${hours(q.used_core_hours)} used, ${hours(q.reserved_core_hours)} reserved, ${limit(q.available_core_hours, hours)} left` }),
  );
}

async function loadWorkspaces() {
  const { data } = await api("GET", "/workspaces/");
  const rows = data.workspaces.map((w) => el("tr", { "data-workspace": w.id },
    el("td", {}, el("a", { href: `/ui/workspaces/${w.id}/`, text: w.name })),
    el("td", {}, statusBadge(w.status)),
    el("td", { text: bytes(w.disk_space) }),
    el("td", { text: when(w.datetime_last_job_launch) })));
  $("#workspaces").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 4, text: "No workspaces yet." }))]));
}

function shareLine(share, incoming) {
  const original = share.original_workspace_id, copy = share.shared_workspace_id;
  const person = incoming ? original.user_id : copy.user_id;
  const who = `${person.first_name} ${person.last_name}`.trim() || person.username;
  const line = el("li", { "data-share": copy.id },
    el("strong", { text: original.name }), ` ${incoming ? "from" : "to"} ${who} `,
    el("span", { class: "hint", text: share.is_accepted ? "accepted" : "waiting" }));
  if (!share.is_accepted && incoming) {
    line.append(" ", el("button", { type: "button", text: "Accept", onclick: () => attempt(async () => {
      await api("PUT", `/shared_workspaces/${copy.id}/accept/`);
      flash(`Accepted "${original.name}".`, "ok");
      await Promise.all([loadShares(), loadWorkspaces()]);
    }) }));
  }
  if (!share.is_accepted) {
    line.append(" ", el("button", { type: "button", class: "link", text: incoming ? "Decline" : "Cancel",
      onclick: () => attempt(async () => {
        await api("DELETE", `/shared_workspaces/${copy.id}/`);
        await loadShares();
      }) }));
  }
  return line;
}

async function loadShares() {
  const { data } = await api("GET", "/shared_workspaces/");
  const none = (text) => [el("li", { class: "hint", text })];
  const incoming = data.shared_workspaces.map((s) => shareLine(s, true));
  const outgoing = data.original_workspaces.map((s) => shareLine(s, false));
  $("#shares-in").replaceChildren(...(incoming.length ? incoming : none("Nothing shared with you.")));
  $("#shares-out").replaceChildren(...(outgoing.length ? outgoing : none("You have shared nothing.")));
}

function homePage() {
  const refresh = () => attempt(() => Promise.all([loadWorkspaces(), loadQuota(), loadShares()]));
  refresh();
  watch("/jobs/", debounce(() => attempt(() => Promise.all([loadWorkspaces(), loadQuota()]))));
  $("#create-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    attempt(async () => {
      const { data } = await api("POST", "/workspaces/", {
        name: form.name.value, description: form.description.value });
      await uploadFiles(data.workspace.id, form.files.files);
      flash(`Workspace "${data.workspace.name}" created.`, "ok");
      form.reset();
      await loadWorkspaces();
    });
  });
}

// --- a workspace ------------------------------------------------------------------------

function parameterInput(p, defaults) {
  const v = p.validation || {};
  const numeric = v.type === "int" || v.type === "float";
  const value = defaults[p.variable_name] ?? p.default_value;
  const input = el("input", {
    name: p.variable_name, id: `param-${p.variable_name}`,
    type: v.type === "bool" ? "checkbox" : numeric ? "number" : "text",
    min: v.min, max: v.max, step: v.type === "float" ? "any" : numeric ? "1" : undefined,
    required: v.required || undefined, "data-type": v.type || "str",
  });
  if (v.type === "bool") input.checked = Boolean(value);
  else if (value !== null && value !== undefined) input.value = value;
  return el("label", { title: p.description || "" }, `${p.display_name} `, input);
}

function resourceOptions(fieldset) {
  const options = {};
  for (const input of fieldset.querySelectorAll("input")) {
    const type = input.dataset.type;
    if (type === "bool") { options[input.name] = input.checked; continue; }
    if (input.value === "") continue;  // left out: the server says if it is required
    // Numbers the page cannot read go as typed: the server's message names the problem.
    const number = Number(input.value);
    options[input.name] = (type === "int" && Number.isInteger(number)) || (type === "float" && !Number.isNaN(number))
      ? number : input.value;
  }
  return options;
}

async function loadWorkspace(id) {
  const { data } = await api("GET", `/workspaces/${id}/`);
  const w = data.workspaces[0];
  if (!w) {  // not the caller's (or gone): the API lists nothing
    document.querySelectorAll("main > section").forEach((s) => { s.hidden = true; });
    throw new ApiRefusal(`Workspace ${id} not found.`);
  }
  $("#ws-name").textContent = w.name;
  $("#ws-description").textContent = w.description;
  $("#ws-status").replaceChildren(statusBadge(w.status));
  $("#ws-size").textContent = bytes(w.disk_space);
  const files = (w.workspace_details?.current_workspace_details?.files || []).map((f) => el("li", { text: f.name }));
  $("#files").replaceChildren(...(files.length ? files : [el("li", { class: "hint", text: "No files." })]));
  document.title = `${w.name} · User Workspaces`;
  return w;
}

async function loadWorkspaceJobs(id) {
  let jobs = [];
  try { jobs = (await api("GET", `/jobs/?workspace_id=${id}`)).data.jobs; } catch { jobs = []; }
  const rows = jobs.slice().reverse().map((j) => el("tr", { "data-job": j.id },
    el("td", {}, el("a", { href: `/ui/jobs/${j.id}/`, text: `#${j.id}` })),
    el("td", { text: j.job_type }), el("td", {}, statusBadge(j.status)),
    el("td", { text: when(j.datetime_created) })));
  $("#ws-jobs").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 4, text: "No jobs yet." }))]));
}

async function setUpStartForm(workspace) {
  const [{ data: types }, { data: params }] = await Promise.all([
    api("GET", "/job_types/"), api("GET", "/parameters/")]);
  const select = $("#job-type");
  select.replaceChildren(...Object.values(types.job_types).map((t) => el("option", {
    value: t.id, text: t.name, selected: t.id === workspace.default_job_type || undefined }))) ;
  $("#parameters").append(...params.parameters.map((p) => parameterInput(p, {})));
}

function workspacePage() {
  const id = document.body.dataset.workspaceId;
  const refresh = () => attempt(() => Promise.all([loadWorkspace(id), loadWorkspaceJobs(id)]));
  attempt(async () => {
    await setUpStartForm(await loadWorkspace(id));
    await Promise.all([loadWorkspaceJobs(id), loadQuota("#start-quota")]);
  });
  watch("/jobs/", (event) => {
    if (String(event.workspace_id) === id) { refresh(); attempt(() => loadQuota("#start-quota")); }
  });
  $("#start-form").setAttribute("novalidate", "");
  $("#start-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(async () => {
      const { data } = await api("PUT", `/workspaces/${id}/start/`, {
        job_type: $("#job-type").value, job_details: {},
        resource_options: resourceOptions($("#parameters")) });
      location.assign(`/ui/jobs/${data.job.id}/`);
    });
  });
  $("#upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(async () => {
      await uploadFiles(id, event.target.files.files);
      event.target.reset();
      flash("Uploaded.", "ok");
      await loadWorkspace(id);
    });
  });
  $("#share-search").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(async () => {
      const q = encodeURIComponent(event.target.search.value);
      const { data } = await api("GET", `/users/?search=${q}`);
      const found = data.users.map((u) => el("li", {},
        `${`${u.first_name} ${u.last_name}`.trim() || u.username} (${u.username}) `,
        el("button", { type: "button", text: "Share", onclick: () => attempt(async () => {
          await api("POST", "/shared_workspaces/", { original_workspace_id: Number(id), shared_user_ids: [u.id] });
          flash(`Shared with ${u.username}: they will find it under "Shared with me".`, "ok");
        }) })));
      $("#share-results").replaceChildren(...(found.length ? found
        : [el("li", { class: "hint", text: "Nobody found." })]));
    });
  });
  $("#delete-workspace").addEventListener("click", () => {
    if (!confirm("Delete this workspace and all its files? This cannot be undone.")) return;
    attempt(async () => {
      const { message } = await api("DELETE", `/workspaces/${id}/`);
      flash(message, "ok");
      setTimeout(() => location.assign("/ui/"), 800);
    });
  });
}

// --- a job ------------------------------------------------------------------------------

const ACTIVE = new Set(["pending", "running", "stopping"]);

function jobPage() {
  const id = document.body.dataset.jobId;
  let job = null, deadline = null;

  const describe = (entry) => entry.status ? `${entry.status}${entry.detail ? `: ${entry.detail}` : ""}`
    : entry.error ? `${entry.step}: ${entry.error}` : entry.name || entry.detail || entry.type;

  const loadTimeline = () => attempt(async () => {
    const { data } = await api("GET", `/jobs/${id}/events/`);
    $("#timeline").replaceChildren(...data.events.map((e) => el("li", { class: `event event-${e.type}` },
      el("time", { datetime: e.time, text: when(e.time) }), " ", describe(e))));
  });

  const render = () => {
    $("#job-type").textContent = job.job_type;
    $("#job-status").replaceChildren(statusBadge(job.status));
    const current = job.job_details?.current_job_details || {};
    $("#job-message").textContent = current.message || current.last_event || "";
    $("#back").href = job.workspace_id ? `/ui/workspaces/${job.workspace_id}/` : "/ui/";
    const link = current.connection_details;
    const open = $("#open");
    open.hidden = !(job.status === "running" && link?.url_path);
    if (!open.hidden) open.href = `${link.url_domain || ""}${link.url_path}`;
    const limit = job.job_details?.metrics?.time_limit_min;
    deadline = ACTIVE.has(job.status) && limit ? Date.parse(job.datetime_created) + limit * 60000 : null;
    $("#stop").disabled = !ACTIVE.has(job.status) || job.status === "stopping";
    $("#extend-form button").disabled = !["pending", "running"].includes(job.status);
    tick();
  };

  const tick = () => {
    $("#time-left").textContent = deadline === null ? "–" : duration((deadline - Date.now()) / 1000);
  };

  // The owner's session link carries a one-time ticket: only GET /jobs/{id}/ makes one.
  const load = () => attempt(async () => {
    const found = (await api("GET", `/jobs/${id}/`)).data.jobs[0];
    if (!found) {
      document.querySelectorAll("main > section").forEach((s) => { s.hidden = true; });
      throw new ApiRefusal(`Job ${id} not found.`);
    }
    job = found;
    render();
    if (!ACTIVE.has(job.status)) await loadTimeline();
  });

  load();
  setInterval(tick, 1000);
  let shown = null;
  watch(`/jobs/${id}/`, (event) => {
    const key = `${event.status}|${JSON.stringify(event.current_job_details?.connection_details || null)}`;
    if (key !== shown) { shown = key; load(); }
  });
  $("#stop").addEventListener("click", () => attempt(async () => {
    const { message } = await api("PUT", `/jobs/${id}/stop/`);
    flash(message, "ok");
  }));
  $("#extend-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(async () => {
      const { data } = await api("PUT", `/jobs/${id}/extend/`, { minutes: Number(event.target.minutes.value) });
      job.job_details.metrics = { ...(job.job_details.metrics || {}), time_limit_min: data.time_limit_min };
      render();
      flash(`Extended: the time limit is now ${data.time_limit_min} minutes.`, "ok");
    });
  });
}

// --- every page -------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#sign-out")?.addEventListener("click", () => attempt(async () => {
    await fetch("/ui/logout/", { method: "POST", headers: { "X-UWS-CSRF": CSRF }, credentials: "same-origin" });
    location.assign("/ui/");
  }));
  const pages = { home: homePage, workspace: workspacePage, job: jobPage };
  pages[document.body.dataset.page]?.();
});
