"""Pure parsing of quantum-journal.org pages: HTML text in, a `PaperItem` or an `ErrorItem` out.

Works on both layouts we must expect (the live site's markup could not be seen from here): highwire `citation_*`
meta tags are preferred; each field falls back to the visible text blocks ("Published: YYYY-MM-DD, volume V, page P",
"Eprint: arXiv:...", "Doi: https://doi.org/...", "Citation: Quantum V, P (YYYY).", an "Abstract" heading then the
text), found by their wording and document order, never by a theme's CSS classes. LaTeX is kept as written,
entities decoded, whitespace normalised.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any
from urllib.parse import urlsplit

from qrb.schema import ErrorItem, PaperItem

PAPER_PATH_RE = re.compile(r"/papers/(q-(\d{4})-(\d{2})-(\d{2})-(\d+))/?$")
DOI_RE = re.compile(r"10\.\d{4,9}/[^\s\"'<>]+")

_BLOCK = {"address", "article", "aside", "blockquote", "body", "br", "dd", "div", "dl", "dt", "figcaption", "figure",
          "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre",
          "section", "table", "tbody", "thead", "tr", "ul", "html", "head", "title"}
_CELL = {"td", "th"}  # a table row is one block; its cells are joined by a space
_SKIP = {"script", "style", "noscript", "template", "head", "svg", "math"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_ABSTRACT_STOP = re.compile(r"^[►▶▸▼\s]*(bibtex( data)?|references|cited by|citations?|download|this paper is "
                            r"published|keywords?|related|share)\b", re.I)
_PUBLISHED = re.compile(r"Published:?\s*(\d{4}-\d{2}-\d{2})\s*,\s*volume\s*(\d+)\s*,\s*page\s*(\d+)", re.I)
_EPRINT = re.compile(r"\bEprint:?\s*(?:arXiv:\s*)?((?:\d{4}\.\d{4,5}|[a-z\-]+(?:\.[A-Z]{2})?/\d{7})(?:v\d+)?)", re.I)
_DOI_LINE = re.compile(r"\bDoi:?\s*(?:https?://(?:dx\.)?doi\.org/)?(10\.\d{4,9}/\S+)", re.I)
_LABEL_ONLY = re.compile(r"^(Published|Eprint|Doi|DOI|Citation)\s*:?$", re.I)
_CITATION = re.compile(r"\bCitation:?\s*(Quantum\s+\d+\s*,\s*\d+\s*\(\d{4}\)\.?)", re.I)
_CC_URL = re.compile(r"creativecommons\.org/licen[cs]es/([a-z\-]+)/(\d+(?:\.\d+)?)", re.I)
_CC_TEXT = re.compile(r"\bCC[ -](BY(?:[ -](?:NC|SA|ND))*)[ -](\d\.\d)\b")


def norm(s: str | None) -> str:
    """Collapse every run of whitespace (including NBSP) to one space; strip."""
    return " ".join((s or "").split())


def paper_id_from_url(url: str) -> tuple[str, _dt.date] | None:
    """(`q-YYYY-MM-DD-N`, date) for a paper URL, else None."""
    if not (m := PAPER_PATH_RE.search(urlsplit(url).path)):
        return None
    try:
        return m.group(1), _dt.date(int(m.group(2)), int(m.group(3)), int(m.group(4)))
    except ValueError:
        return None


def _iso_date(s: str) -> str | None:
    if not (m := re.match(r"^\s*(\d{4})[-/](\d{1,2})[-/](\d{1,2})", s or "")):
        return None
    try:
        return _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3))).isoformat()
    except ValueError:
        return None


def _license_id(s: str) -> str | None:
    if m := _CC_URL.search(s or ""):
        return f"CC-{m.group(1).upper()}-{m.group(2)}"
    if m := _CC_TEXT.search(s or ""):
        return f"CC-{m.group(1).replace(' ', '-').upper()}-{m.group(2)}"
    return None


def _blocks(root: Any) -> list[tuple[Any, str]]:
    """The visible text as (owning block element, normalised text) in document order: a new block starts at every
    block-level element boundary and at <br>."""
    out: list[list[Any]] = [[root, []]]  # [owning block, its text parts]

    def walk(el: Any, owner: Any) -> None:
        tag = el.tag.lower() if isinstance(el.tag, str) else None
        if tag is None or tag in _SKIP:  # comments, processing instructions, scripts
            if el.tail:
                out[-1][1].append(el.tail)
            return
        block = tag in _BLOCK
        if block:
            out.append([el, []])
        elif tag in _CELL:
            out[-1][1].append(" ")
        if el.text:
            out[-1][1].append(el.text)
        for ch in el:
            walk(ch, el if block else owner)
        if block:
            out.append([owner, []])
        elif tag in _CELL:
            out[-1][1].append(" ")
        if el.tail:
            out[-1][1].append(el.tail)

    walk(root, root)
    return [(owner, t) for owner, parts in out if (t := norm("".join(parts)))]


def _meta(root: Any) -> dict[str, list[str]]:
    metas: dict[str, list[str]] = {}
    for m in root.iter("meta"):
        name = (m.get("name") or m.get("property") or "").strip().lower()
        content = m.get("content")
        if name and content is not None and norm(content):
            metas.setdefault(name, []).append(norm(content))
    return metas


def _authors_from_block(owner: Any, text: str) -> list[str]:
    """One author per child element when the block is built that way (names may hold commas: "Jobst, Bernhard"),
    else split the text on commas and 'and'."""
    kids = [norm(ch.text_content()) for ch in owner if isinstance(ch.tag, str) and ch.tag.lower() != "sup"]
    kids = [k for k in kids if k and not k.isdigit()]
    joined = norm(" ".join(kids))
    stripped = norm(re.sub(r"[\d,;*†‡]+|\band\b", " ", text))
    if kids and norm(re.sub(r"[\d,;*†‡]+|\band\b", " ", joined)) == stripped:
        return [re.sub(r"[\d,*†‡]+$", "", k).strip() for k in kids]
    parts = re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+|\s*;\s*", text)
    return [p for p in (re.sub(r"[\d*†‡]+$", "", x).strip() for x in parts) if p]


def parse_paper_html(text: str, url: str) -> PaperItem | ErrorItem:
    """Parse one paper page. Never raises on bad input: a page lacking a required field (doi, title, published,
    abstract) or that cannot be read as HTML becomes an `ErrorItem` naming the reason."""
    import lxml.etree
    import lxml.html

    try:
        root = lxml.html.document_fromstring(text or "<html></html>")
    except (lxml.etree.ParserError, ValueError) as exc:
        return ErrorItem(url=url, reason="malformed_html", detail=f"unparseable: {exc}")
    metas = _meta(root)
    body = root.find("body")
    blocks = _blocks(body) if body is not None else []
    first = lambda *names: next((metas[n][0] for n in names if metas.get(n)), None)  # noqa: E731

    # title
    title = first("citation_title", "dc.title", "og:title")
    h1 = [(i, t) for i, (o, t) in enumerate(blocks) if o.tag == "h1"]
    title_idx = next((i for i, t in h1 if t == title), h1[0][0] if h1 else None)  # the meta's <h1>, else the first
    title = title or (h1[0][1] if h1 else None)

    # visible "Published / Eprint / Doi / Citation" lines
    vis: dict[str, Any] = {}
    pub_idx = None
    for i, (_, t) in enumerate(blocks):
        if _LABEL_ONLY.match(t) and i + 1 < len(blocks):  # "Published:" | "2024-12-03, volume 8, page 1544"
            t = f"{t.rstrip(':')}: {blocks[i + 1][1]}"
        if "published" not in vis and (m := _PUBLISHED.search(t)):
            vis["published"], vis["volume"], vis["page"] = m.groups()
            pub_idx = i
        if "arxiv" not in vis and (m := _EPRINT.search(t)):
            vis["arxiv"] = "arXiv:" + m.group(1)
        if "doi" not in vis and (m := _DOI_LINE.search(t)):
            vis["doi"] = m.group(1).rstrip(".,;")
        if "citation" not in vis and (m := _CITATION.search(t)):
            vis["citation"] = norm(m.group(1))

    if title_idx is None and pub_idx is None and not any(k.startswith("citation_") for k in metas):
        return ErrorItem(url=url, reason="malformed_html",
                         detail="no citation_* meta tags, no <h1> title and no 'Published:' line")

    # doi
    m = DOI_RE.search(first("citation_doi", "dc.identifier", "prism.doi") or "")
    pid = paper_id_from_url(url)
    doi = (m.group(0) if m else None) or vis.get("doi") or (f"10.22331/{pid[0]}" if pid else None)

    # published / volume / page
    published = _iso_date(first("citation_publication_date", "citation_date", "citation_online_date",
                                "dc.date", "prism.publicationdate") or "") or vis.get("published")
    doi_m = re.search(r"/q-(\d{4})-(\d{2})-(\d{2})-(\d+)$", doi or "")
    if not published and doi_m:
        published = _iso_date("-".join(doi_m.groups()[:3]))
    volume = first("citation_volume", "prism.volume") or vis.get("volume")
    page = first("citation_firstpage", "prism.startingpage") or vis.get("page")
    if doi_m:
        volume = volume or str(int(doi_m.group(1)) - 2016)
        page = page or doi_m.group(4)

    # authors and affiliations: meta tags, else the blocks between the title and the "Published:" line
    authors = list(metas.get("citation_author", [])) or list(metas.get("dc.creator", []))
    affiliations = list(dict.fromkeys(metas.get("citation_author_institution", [])))
    if title_idx is not None:
        end = pub_idx if pub_idx is not None and pub_idx > title_idx else min(title_idx + 12, len(blocks))
        between = blocks[title_idx + 1:end]
        if not affiliations:
            affiliations = [t for o, t in between if re.match(r"^\d+\s*\D", t) or o.tag == "li"]
        if not authors:
            cand = [(o, t) for o, t in between if t not in affiliations and not re.match(r"^\d", t)]
            if cand:
                authors = _authors_from_block(*cand[0])

    # abstract: meta, else the blocks after an "Abstract" heading up to the next heading / stop block
    abstract = first("citation_abstract", "dc.description")
    if not abstract:
        parts: list[str] = []
        for i, (o, t) in enumerate(blocks):
            m = re.match(r"^Abstract\s*[:.]?\s*(.*)$", t, re.I)
            if m and (o.tag in _HEADINGS or not m.group(1) or t.lower().startswith("abstract:")):
                if m.group(1):
                    parts.append(m.group(1))
                for o2, t2 in blocks[i + 1:]:
                    if o2.tag in _HEADINGS or _ABSTRACT_STOP.match(t2):
                        break
                    parts.append(t2)
                break
        abstract = norm(" ".join(parts)) or None

    # license: rel=license links, DC.rights, else the text
    lic = next((x for el in root.iter("a", "link") if "license" in (el.get("rel") or "").lower().split()
                and (x := _license_id(el.get("href") or ""))), None)
    lic = (lic or _license_id(first("dc.rights", "citation_license", "dcterms.license") or "")
           or next((x for _, t in blocks if (x := _license_id(t))), None)
           or ("CC-BY-4.0" if any("Creative Commons Attribution 4.0" in t for _, t in blocks) else None))

    missing = [k for k, v in (("title", title), ("abstract", abstract), ("doi", doi), ("published", published))
               if not v]
    if missing:
        return ErrorItem(url=url, reason=f"missing_{missing[0]}", detail="page lacks: " + ", ".join(missing))
    return PaperItem(doi=doi, url=url, title=norm(title), abstract=norm(abstract), published=published,
                     authors=[norm(a) for a in authors if norm(a)],
                     affiliations=[norm(a) for a in affiliations if norm(a)],
                     volume=norm(volume) or None, page=norm(page) or None, arxiv=vis.get("arxiv"),
                     citation=vis.get("citation"), license=lic)


def parse_full_text_html(text: str) -> str | None:
    """The body text of an arXiv HTML (or abs) page, paragraphs joined by blank lines; None when empty."""
    import lxml.html

    try:
        root = lxml.html.document_fromstring(text or "<html></html>")
    except Exception:  # noqa: BLE001 - any unreadable page: no full text
        return None
    body = root.find(".//article") if root.find(".//article") is not None else root.find("body")
    if body is None:
        return None
    return "\n\n".join(t for _, t in _blocks(body)) or None
