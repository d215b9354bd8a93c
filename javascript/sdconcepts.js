/*
 * sdconcepts: what Gradio cannot do server-side. Clicking a card (.sdconcepts-card, rendered by sdconcepts/ui/cards.py)
 * inserts its text (an embedding name, or <hypernet:name:M>) into the prompt of the tab it sits in (txt2img's
 * #sdconcepts_prompt, or img2img's #sdconcepts_img2img_prompt for the cards under #sdconcepts_img2img_root) at the
 * cursor; clicking it again removes it (A1111's toggle). Embedding cards write to that tab's negative prompt when it
 * had focus last, as A1111's Textual Inversion cards do; hypernetwork tags always go to the prompt.
 *
 * Loaded globally by A1111/Forge (javascript/*.js) and by the standalone app on page load; it installs itself once.
 * It touches only elements under #sdconcepts_root and only defines window.sdconcepts. Works with the Gradio 3 DOM
 * (A1111), Gradio 4 (Forge) and Gradio 6 (standalone): all it needs is a textarea inside #sdconcepts_prompt.
 */
(function () {
    "use strict";
    if (window.sdconcepts && window.sdconcepts.installed) {
        return;
    }

    // Each tab with cards and prompts: the element that holds it -> its prompt ids. Cards outside all of them
    // (txt2img's, and the only ones inside a host) use txt2img's prompts.
    var SCOPES = {"sdconcepts_img2img_root": {prompt: "sdconcepts_img2img_prompt", negative: "sdconcepts_img2img_neg_prompt"}};
    var DEFAULT_SCOPE = {prompt: "sdconcepts_prompt", negative: "sdconcepts_neg_prompt"};
    var SEPARATOR = " "; // A1111's extra_networks_add_text_separator default

    // negativeLast: per prompt id, whether that tab's negative prompt had focus last.
    var state = {negativeLast: {}, caret: {}};

    function appRoot() {
        var app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }

    function promptArea(id) {
        return appRoot().querySelector("#" + id + " textarea");
    }

    function escapeRegExp(text) {
        return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    }

    // A1111 matches <type:name:number> regardless of the number (clicking a card whose multiplier changed still
    // removes the tag); tags with other arguments are left alone. Plain text (an embedding name) matches as a whole
    // word, so removing "cat" never eats the start of "catgirl" (A1111 matched any substring there).
    // A tag may be followed by the card's activation text (A1111's re_extranet: `<...>(.*)`); it goes with the tag.
    var TAG = /^<([^:^>]+:[^:]+):[\d.]+>([\s\S]*)$/;

    function tagPattern(text) {
        var tag = TAG.exec(text);
        if (tag) {
            return new RegExp("<" + escapeRegExp(tag[1]) + ":[\\d.]+>", "g");
        }
        return new RegExp("(^|[^\\w])(" + escapeRegExp(text) + ")(?![\\w])", "g");
    }

    // Pure: toggle `text` in `value` with the caret at `caret`. Returns {value, caret, removed}.
    function toggleText(value, text, caret) {
        var pattern = tagPattern(text);
        var tag = TAG.exec(text);
        var isTag = tag !== null;
        var removedAt = -1;
        var result = value.replace(pattern, function () {
            var offset = arguments[arguments.length - 2];
            var lead = isTag ? "" : arguments[1];
            if (removedAt < 0) {
                removedAt = offset + lead.length;
            }
            return lead;
        });
        if (removedAt >= 0 && isTag && tag[2] && result.substr(removedAt, tag[2].length) === tag[2]) {
            // The activation text written after the tag leaves with it, as in A1111.
            result = result.slice(0, removedAt) + result.slice(removedAt + tag[2].length);
        }
        if (removedAt >= 0) {
            // Drop the separator that was written before the text, as A1111 does, and tidy a doubled space.
            var start = removedAt;
            if (start >= SEPARATOR.length && result.substr(start - SEPARATOR.length, SEPARATOR.length) === SEPARATOR) {
                result = result.slice(0, start - SEPARATOR.length) + result.slice(start);
                start -= SEPARATOR.length;
            } else if (start === 0 && result.substr(0, SEPARATOR.length) === SEPARATOR) {
                result = result.slice(SEPARATOR.length);
            }
            return {value: result, caret: start, removed: true};
        }
        var at = Math.max(0, Math.min(caret === undefined || caret === null ? value.length : caret, value.length));
        var before = value.slice(0, at);
        var after = value.slice(at);
        var insert = text;
        if (before.length && !/\s$/.test(before)) {
            insert = SEPARATOR + insert;
        }
        var end = before.length + insert.length;
        if (after.length && !/^[\s,]/.test(after)) {
            insert = insert + SEPARATOR;
        }
        return {value: before + insert + after, caret: end, removed: false};
    }

    // Gradio keeps its own copy of a textbox's value; an input event makes it read ours (A1111's updateInput).
    function notifyGradio(area) {
        area.dispatchEvent(new Event("input", {bubbles: true}));
    }

    function scopeOf(path) {
        for (var i = 0; i < path.length; i++) {
            var el = path[i];
            if (el && el.nodeType === 1 && el.id && Object.prototype.hasOwnProperty.call(SCOPES, el.id)) {
                return SCOPES[el.id];
            }
        }
        return DEFAULT_SCOPE;
    }

    function toggleInPrompt(text, allowNegative, scope) {
        scope = scope || DEFAULT_SCOPE;
        return toggleIn(allowNegative && state.negativeLast[scope.prompt] ? scope.negative : scope.prompt, text);
    }

    function findIn(event, test) {
        var path = event.composedPath ? event.composedPath() : [];
        for (var i = 0; i < path.length; i++) {
            var el = path[i];
            if (el && el.nodeType === 1 && test(el)) {
                return el;
            }
        }
        return null;
    }

    function isCard(el) {
        return el.classList.contains("sdconcepts-card");
    }

    // The scope whose prompt or negative prompt `el` is, or null.
    function promptScope(el) {
        var scopes = [DEFAULT_SCOPE];
        for (var key in SCOPES) {
            if (Object.prototype.hasOwnProperty.call(SCOPES, key)) {
                scopes.push(SCOPES[key]);
            }
        }
        for (var i = 0; i < scopes.length; i++) {
            if (el.id === scopes[i].prompt || el.id === scopes[i].negative) {
                return scopes[i];
            }
        }
        return null;
    }

    function promptOf(el) {
        return promptScope(el) ? el : null;
    }

    function toggleIn(id, text) {
        var area = promptArea(id);
        if (!area) {
            return null;
        }
        var caret = Object.prototype.hasOwnProperty.call(state.caret, id) ? state.caret[id] : area.value.length;
        var outcome = toggleText(area.value, text, caret);
        area.value = outcome.value;
        state.caret[id] = outcome.caret;
        notifyGradio(area);
        return outcome;
    }

    // A card with negative text (A1111's user metadata) writes its text to the prompt and the negative text to the
    // negative prompt, as A1111's cardClicked does; otherwise the prompt that had focus last gets it. Both are the
    // prompts of the tab the card sits in.
    function activate(card, event) {
        var scope = scopeOf(event && event.composedPath ? event.composedPath() : []);
        var text = card.getAttribute("data-prompt") || "";
        var negative = card.getAttribute("data-negative") || "";
        if (negative) {
            var outcome = toggleIn(scope.prompt, text);
            toggleIn(scope.negative, negative);
            return outcome;
        }
        return toggleInPrompt(text, card.getAttribute("data-allow-negative") === "1", scope);
    }

    function isEditButton(el) {
        return el.classList.contains("sdconcepts-card-edit");
    }

    // The edit button opens the metadata editor of the card's tab: the card's file goes into the hidden path box,
    // then the hidden open button asks the server for the fields (A1111's editor opens the same way).
    function openEditor(card) {
        // The editor belongs to the card tab the card is shown in (txt2img's sdconcepts_ti_cards, img2img's
        // sdconcepts_img2img_ti_cards, ...): its ids share the cards' prefix.
        var container = card.closest("[id^='sdconcepts_'][id$='_cards']");
        var kind = card.classList.contains("sdconcepts-card-embedding") ? "ti" : "hn";
        var prefix = container ? container.id.slice(0, -"_cards".length) : "sdconcepts_" + kind;
        var root = appRoot();
        var box = root.querySelector("#" + prefix + "_meta_path");
        var input = box && box.querySelector("textarea, input");
        var button = root.querySelector("#" + prefix + "_meta_open");
        if (button && button.tagName !== "BUTTON") {
            button = button.querySelector("button");
        }
        if (!input || !button) {
            return false;
        }
        input.value = card.getAttribute("data-path") || "";
        notifyGradio(input);
        button.click();
        return true;
    }

    function isConvertButton(el) {
        return el.classList.contains("sdconcepts-skipped-convert");
    }

    // A skipped SD 1.x embedding's "Convert for SDXL": its file goes into the Embedding tools' convert box, then
    // that panel's button writes the SDXL copy (the server answers in the panel and the cards re-render).
    function convertSkipped(button) {
        var root = appRoot();
        var box = root.querySelector("#sdconcepts_ti_tools_convert_source");
        var input = box && box.querySelector("textarea, input");
        var go = root.querySelector("#sdconcepts_ti_tools_convert");
        if (go && go.tagName !== "BUTTON") {
            go = go.querySelector("button");
        }
        if (!input || !go) {
            return false;
        }
        input.value = button.getAttribute("data-path") || "";
        notifyGradio(input);
        go.click();
        return true;
    }

    document.addEventListener("click", function (event) {
        var convertButton = findIn(event, isConvertButton);
        if (convertButton) {
            event.preventDefault();
            convertSkipped(convertButton);
            return;
        }
        var card = findIn(event, isCard);
        if (!card) {
            return;
        }
        if (findIn(event, isEditButton)) {
            event.preventDefault();
            event.stopPropagation();
            openEditor(card);
            return;
        }
        activate(card, event);
    });
    document.addEventListener("keydown", function (event) {
        if (event.key !== "Enter" && event.key !== " ") {
            return;
        }
        var card = findIn(event, isCard);
        if (card) {
            event.preventDefault();
            if (findIn(event, isEditButton)) {
                openEditor(card);
            } else {
                activate(card, event);
            }
        }
    });
    // Remember which prompt had focus last, and where its caret was when it lost focus.
    document.addEventListener("focusin", function (event) {
        var box = findIn(event, promptOf);
        if (box) {
            var scope = promptScope(box);
            state.negativeLast[scope.prompt] = box.id === scope.negative;
        }
    }, true);
    document.addEventListener("focusout", function (event) {
        var box = findIn(event, promptOf);
        var area = event.target;
        if (box && area && area.tagName === "TEXTAREA") {
            state.caret[box.id] = area.selectionEnd;
        }
    }, true);

    // Search as you type: on each keystroke the cards of the shown page are filtered here at once (the words of the
    // query, ANDed, as cards.filter_cards does on the server: name, path relative to the folder, hash, description).
    // When typing pauses, the page script clicks the tab's hidden Search button, and the server's answer over the
    // whole library replaces the cards. Each answer says which query it is for (data-query on .sdconcepts-cards): an
    // answer for older text (one that arrives late, or the last one when gradio dropped the request for the final
    // text) is filtered by the box's text before it is painted (a MutationObserver runs before the next frame), so it
    // never shows cards the text excludes; the summary is marked stale and the server is asked again.
    var SEARCH = /^sdconcepts_((?:img2img_)?(?:ti|hn))_search$/;
    var SEARCH_PAUSE_MS = 300;
    var MAX_RETRIES = 3;

    function searchWords(text) {
        return (text || "").toLowerCase().split(/\s+/).filter(Boolean);
    }

    // Pure: whether a card's data-search text holds every word.
    function matchesSearch(text, words) {
        for (var i = 0; i < words.length; i++) {
            if (text.indexOf(words[i]) < 0) {
                return false;
            }
        }
        return true;
    }

    function searchInput(kind) {
        var box = appRoot().querySelector("#sdconcepts_" + kind + "_search");
        return box && box.querySelector("textarea, input");
    }

    // Filter the shown cards by the box's text; returns whether the shown answer is the server's for that text.
    function filterShown(kind) {
        var root = appRoot();
        var input = searchInput(kind);
        var words = input ? searchWords(input.value) : [];
        var container = root.querySelector("#sdconcepts_" + kind + "_cards");
        if (!container) {
            return true;
        }
        var list = container.querySelector(".sdconcepts-cards");
        var answered = list ? list.getAttribute("data-query") : null;
        var current = answered === null || searchWords(answered).join(" ") === words.join(" ");
        var cards = container.querySelectorAll(".sdconcepts-card");
        var shown = 0;
        for (var i = 0; i < cards.length; i++) {
            var match = matchesSearch(cards[i].getAttribute("data-search") || "", words);
            var display = match ? "" : "none";
            if (cards[i].style.display !== display) {  // untouched cards cost no style work
                cards[i].style.display = display;
            }
            shown += match ? 1 : 0;
        }
        if (list) {
            list.classList.toggle("sdconcepts-searching", !current);
            list.classList.toggle("sdconcepts-none-shown", !current && shown === 0 && cards.length > 0);
        }
        var summary = root.querySelector("#sdconcepts_" + kind + "_summary .sdconcepts-summary");
        if (summary) {
            summary.classList.toggle("sdconcepts-stale", !current);
        }
        return current;
    }

    var watched = {};
    var lastAnswer = {};
    var pendingSearch = {};
    var retries = {};

    function clickSearch(kind) {
        pendingSearch[kind] = null;
        var go = appRoot().querySelector("#sdconcepts_" + kind + "_search_go");
        if (go && go.tagName !== "BUTTON") {
            go = go.querySelector("button");
        }
        if (go) {
            go.click();
        }
    }

    // Ask the server for the box's text once typing has paused (a request per keystroke would queue answers the
    // next keystroke makes stale).
    function scheduleSearch(kind, delay) {
        clearTimeout(pendingSearch[kind]);
        pendingSearch[kind] = setTimeout(function () { clickSearch(kind); }, delay);
    }

    function onAnswer(kind) {
        var container = appRoot().querySelector("#sdconcepts_" + kind + "_cards");
        var list = container && container.querySelector(".sdconcepts-cards");
        var fresh = list !== lastAnswer[kind];
        lastAnswer[kind] = list;
        if (filterShown(kind)) {
            retries[kind] = null;
            return;
        }
        if (!fresh || pendingSearch[kind]) {
            return;  // not a new answer, or a request for the newer text is already on its way
        }
        // An answer for older text and nothing asked since: gradio dropped the request for the final text (gradio
        // 3.41 drops one that comes while the previous is running; 4 and 6 drop a second click). Ask again, a
        // bounded number of times for one text, so a server that keeps failing is not asked forever.
        var input = searchInput(kind);
        var value = input ? input.value : "";
        var tries = retries[kind] && retries[kind].value === value ? retries[kind].count : 0;
        if (tries < MAX_RETRIES) {
            retries[kind] = {value: value, count: tries + 1};
            scheduleSearch(kind, 0);
        }
    }

    function watchCards(kind) {
        var container = appRoot().querySelector("#sdconcepts_" + kind + "_cards");
        if (!container || watched[kind] === container || typeof MutationObserver === "undefined") {
            return;
        }
        watched[kind] = container;
        lastAnswer[kind] = container.querySelector(".sdconcepts-cards");
        new MutationObserver(function () { onAnswer(kind); }).observe(container, {childList: true, subtree: true});
    }

    document.addEventListener("input", function (event) {
        var box = findIn(event, function (el) { return SEARCH.test(el.id || ""); });
        if (box) {
            var kind = SEARCH.exec(box.id)[1];
            watchCards(kind);
            filterShown(kind);
            scheduleSearch(kind, SEARCH_PAUSE_MS);
        }
    }, true);

    // Open the tab labelled `label` of the gr.Tabs with id `tabsId` by clicking its button, as A1111's send buttons
    // do: a server-side Tabs update is dropped when it repeats the last value the server sent, although the user has
    // clicked another tab since (gradio 4 and later). Buttons of nested Tabs and gradio 6's hidden overflow copies
    // are skipped. Returns whether a button was clicked.
    function openTab(tabsId, label) {
        var tabs = appRoot().querySelector("#" + tabsId);
        if (!tabs) {
            return false;
        }
        var buttons = tabs.querySelectorAll("button");
        for (var i = 0; i < buttons.length; i++) {
            var button = buttons[i];
            if (button.textContent.trim() === label && button.closest(".tabs") === tabs &&
                    !button.closest("[aria-hidden='true']")) {
                button.click();
                return true;
            }
        }
        return false;
    }

    window.sdconcepts = {installed: true, state: state, toggleText: toggleText, toggleInPrompt: toggleInPrompt,
                         openEditor: openEditor, openTab: openTab,
                         matchesSearch: matchesSearch, searchWords: searchWords};
})();
