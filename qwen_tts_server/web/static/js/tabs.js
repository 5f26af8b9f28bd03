// Accessible tabs: arrow keys, Home and End move between tabs; the URL's #hash names the open one.

import { $, $$ } from "./dom.js";

export class Tabs {
  constructor(tablist, { onChange = () => {} } = {}) {
    this.tabs = $$('[role="tab"]', tablist);
    this.onChange = onChange;
    for (const tab of this.tabs) {
      tab.addEventListener("click", () => this.select(tab, { focus: false }));
      tab.addEventListener("keydown", (event) => this.key(event, tab));
    }
    window.addEventListener("hashchange", () => this.fromHash());
    document.addEventListener("click", (event) => {
      const link = event.target.closest("[data-goto]");
      if (link) {
        event.preventDefault();
        this.open(link.dataset.goto);
      }
    });
    this.fromHash();
  }

  /** Open the tab named `name` (speak, voices, batch, history). */
  open(name, options) {
    const tab = this.tabs.find((t) => t.id === `tab-${name}`);
    if (tab) this.select(tab, options);
  }

  fromHash() {
    this.open(location.hash.slice(1) || "speak", { focus: false, keepHash: true });
  }

  select(tab, { focus = true, keepHash = false } = {}) {
    for (const other of this.tabs) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      $(`#${other.getAttribute("aria-controls")}`).hidden = !selected;
    }
    if (focus) tab.focus();
    const name = tab.id.replace(/^tab-/, "");
    if (!keepHash && location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
    this.onChange(name);
  }

  key(event, tab) {
    const index = this.tabs.indexOf(tab);
    const last = this.tabs.length - 1;
    const target = {
      ArrowRight: index === last ? 0 : index + 1,
      ArrowLeft: index === 0 ? last : index - 1,
      Home: 0,
      End: last,
    }[event.key];
    if (target === undefined) return;
    event.preventDefault();
    this.select(this.tabs[target]);
  }
}
