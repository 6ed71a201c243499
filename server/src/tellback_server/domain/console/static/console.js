// Tellback console: live updates from the agent event stream, the photo viewer, and
// read markers. Plain JS, loaded as a file (the CSP allows no inline script). The
// server renders every piece of HTML, escaped; this script only moves those pieces.
(function () {
  "use strict";

  const body = document.body;
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.getAttribute("content") : "";
  const EVENT_TYPES = ["conversation.created", "message.created", "conversation.updated", "reset"];

  function debounce(fn, ms) {
    let timer = null;
    return function () {
      clearTimeout(timer);
      timer = setTimeout(fn, ms);
    };
  }

  function post(url) {
    return fetch(url, {
      method: "POST",
      headers: { "X-CSRF-Token": csrf },
      credentials: "same-origin",
    });
  }

  async function fragment(url) {
    const response = await fetch(url, {
      headers: { "X-Console-Fragment": "1" },
      credentials: "same-origin",
    });
    if (response.status === 401) {
      window.location.reload(); // signed out: the reload lands on the sign-in page
      return null;
    }
    if (!response.ok) return null;
    // An inert document: nothing in it runs, its nodes are then moved into the page.
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    return doc.body.firstElementChild;
  }

  function markUpdated() {
    body.dataset.liveUpdates = String(Number(body.dataset.liveUpdates || "0") + 1);
  }

  function connect(onEvent) {
    if (!window.EventSource) return;
    // Same origin: the browser sends the console's session cookie, which this one
    // read-only endpoint accepts in place of an Authorization header.
    const source = new EventSource("/v1/agent/events");
    const badge = document.getElementById("live-status");
    source.addEventListener("open", function () {
      body.dataset.live = "open";
      if (badge) badge.hidden = false;
      onEvent("open", null); // catch up on anything between page render and connect
    });
    source.addEventListener("error", function () {
      body.dataset.live = "closed";
      if (badge) badge.hidden = true;
    });
    EVENT_TYPES.forEach(function (type) {
      source.addEventListener(type, function (event) {
        let payload = null;
        try {
          payload = JSON.parse(event.data);
        } catch (err) {
          payload = null;
        }
        onEvent(type, payload);
      });
    });
    window.addEventListener("pagehide", function () {
      source.close();
    });
  }

  // ----- inbox ------------------------------------------------------------------------

  function inbox() {
    const refresh = debounce(async function () {
      const fresh = await fragment(body.dataset.rowsUrl);
      const current = document.getElementById("inbox-list");
      if (fresh && current && fresh.id === "inbox-list") {
        current.replaceWith(fresh);
        markUpdated();
      }
    }, 200);
    connect(refresh);
  }

  // ----- conversation -----------------------------------------------------------------

  function messageState(li) {
    return li.getAttribute("data-state") || "";
  }

  function mergeThread(fresh) {
    const current = document.getElementById("thread");
    if (!current || !fresh || fresh.id !== "thread") return;
    // Header: replaced. Messages: new ones appended; existing ones replaced only when
    // their attachments changed state (a playing video is not interrupted otherwise).
    ["h1", ".meta"].forEach(function (selector) {
      const a = current.querySelector(selector);
      const b = fresh.querySelector(selector);
      if (a && b) a.replaceWith(b);
    });
    current.dataset.unread = fresh.dataset.unread || "0";
    syncControls(fresh);
    const list = current.querySelector("ol.messages");
    fresh.querySelectorAll("ol.messages > li").forEach(function (li) {
      const existing = document.getElementById(li.id);
      if (!existing) {
        list.appendChild(li);
      } else if (messageState(existing) !== messageState(li)) {
        existing.replaceWith(li);
      }
    });
  }

  function syncControls(thread) {
    // The controls show the new values unless the agent is editing that field.
    const form = document.getElementById("controls-form");
    if (!form) return;
    ["status", "priority", "tags"].forEach(function (name) {
      const field = form.elements.namedItem(name);
      const was = form.elements.namedItem(name + "_was");
      const fresh = thread.getAttribute("data-" + name);
      if (field && was && fresh !== null && field.value === was.value) {
        field.value = fresh;
        was.value = fresh;
      }
    });
  }

  function conversation() {
    const id = body.dataset.conversationId;
    const markRead = function () {
      const thread = document.getElementById("thread");
      if (thread && thread.dataset.unread !== "0" && document.visibilityState === "visible") {
        thread.dataset.unread = "0";
        post(body.dataset.readUrl);
      }
    };
    markRead();
    const refresh = debounce(async function () {
      mergeThread(await fragment(body.dataset.liveUrl));
      markUpdated();
      markRead();
    }, 150);
    connect(function (type, payload) {
      const conv = payload && payload.data && payload.data.conversation;
      if (type === "open" || type === "reset" || (conv && conv.id === id)) refresh();
    });
    document.addEventListener("visibilitychange", markRead);

    const form = document.getElementById("reply-form");
    if (form) {
      form.addEventListener("submit", function () {
        const button = form.querySelector('button[type="submit"]');
        if (button) button.disabled = true; // one click, one reply
      });
    }
  }

  // ----- photo viewer -----------------------------------------------------------------

  function lightbox() {
    const dialog = document.getElementById("lightbox");
    const img = document.getElementById("lightbox-img");
    if (!dialog || !img) return;
    document.addEventListener("click", function (event) {
      const thumb = event.target.closest ? event.target.closest("button.thumb") : null;
      if (!thumb) return;
      const url = thumb.getAttribute("data-full") || "";
      if (!/^https?:\/\//i.test(url)) return;
      img.src = url;
      img.alt = thumb.querySelector("img") ? thumb.querySelector("img").alt : "";
      dialog.showModal();
    });
    dialog.addEventListener("click", function (event) {
      if (event.target === dialog) dialog.close();
    });
    dialog.addEventListener("close", function () {
      img.removeAttribute("src");
    });
  }

  function login() {
    // Arrived from another site: the SameSite=Strict cookie was not sent. Retry once
    // as a same-origin navigation (which sends it); if there is no session, the server
    // answers with this page again, without data-retry.
    const retry = body.dataset.retry || "";
    if (!staysInConsole(retry)) return;
    const target = new URL(retry, window.location.origin);
    if (target.origin !== window.location.origin) return;
    if (target.pathname.indexOf("/console/") !== 0) return;
    window.location.replace(target.pathname + target.search + target.hash);
  }

  function staysInConsole(retry) {
    // As the server's safe_next: a console path, without a "." or ".." segment once
    // percent-decoded (a browser resolves %2e%2e as ..), which would climb out of it.
    if (retry.indexOf("/console/") !== 0) return false;
    let path;
    try {
      path = decodeURIComponent(retry.split(/[?#]/)[0]);
    } catch (_) {
      return false;
    }
    if (/\/\/|\\|%/.test(path) || /\/\/|\\/.test(retry)) return false;
    return path.split("/").every(function (segment) {
      return segment !== "." && segment !== "..";
    });
  }

  if (body.dataset.page === "login") login();
  if (body.dataset.page === "inbox") inbox();
  if (body.dataset.page === "conversation") {
    conversation();
    lightbox();
  }
})();
