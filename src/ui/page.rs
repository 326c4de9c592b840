//! The two HTML pages, rendered from the JSON their API endpoints serve. Every text taken from
//! that JSON goes through [`escape`], the one escaping function: repository names and tags come
//! from clients, platforms, media types and sizes from upstream manifests.

use std::fmt::Write as _;

use serde_json::Value;

use crate::cache::usage::unix_now_ms;
use crate::tools::maintenance::human_size;

const INDEX_HTML: &str = include_str!("assets/index.html");
const IMAGE_HTML: &str = include_str!("assets/image.html");

/// Text made safe for HTML content and attribute values (quoted with `"` or `'`).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as text: strings as they are, numbers and booleans written, null as "-".
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON value as escaped HTML.
fn esc(v: &Value) -> String {
    escape(&text(v))
}

fn size(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_string(), human_size)
}

/// "5m ago" for a Unix millisecond stamp.
fn ago(v: &Value) -> String {
    let Some(ms) = v.as_u64() else {
        return "-".to_string();
    };
    let s = unix_now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// The image page's address for an upstream, repository and reference (escaped for an
/// attribute).
fn image_link(upstream: &str, repo: &str, reference: &str) -> String {
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("upstream", upstream)
        .append_pair("repository", repo)
        .append_pair("reference", reference)
        .finish();
    escape(&format!("image?{q}"))
}

/// `current of max` as a meter and words.
fn usage_meter(out: &mut String, label: &str, used: &Value, max: &Value) {
    let _ = write!(
        out,
        "<p class=\"use\"><span class=\"label\">{}</span> ",
        escape(label)
    );
    match max.as_u64() {
        Some(m) if m > 0 => {
            let _ = write!(
                out,
                "<meter min=\"0\" max=\"{m}\" value=\"{}\" high=\"{}\"></meter> {} of {}",
                used.as_u64().unwrap_or(0),
                m / 10 * 9,
                size(used),
                human_size(m)
            );
        }
        _ => {
            let _ = write!(out, "{} (unbounded)", size(used));
        }
    }
    out.push_str("</p>\n");
}

fn image_table(out: &mut String, title: &str, rows: &Value) {
    let _ = writeln!(out, "<h3>{}</h3>", escape(title));
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        out.push_str("<p class=\"empty\">no image stored</p>\n");
        return;
    }
    out.push_str(
        "<table><thead><tr><th>Image</th><th>Digest</th><th class=\"num\">Size</th>\
         <th>Last used</th><th>Pinned</th></tr></thead><tbody>\n",
    );
    for r in rows {
        let digest = text(&r["digest"]);
        let name = match (r["upstream"].as_str(), r["repository"].as_str()) {
            (Some(up), Some(repo)) => {
                let tag = r["tag"].as_str().unwrap_or_default();
                format!(
                    "<a href=\"{}\">{}/{}:{}</a>",
                    image_link(up, repo, tag),
                    escape(up),
                    escape(repo),
                    escape(tag)
                )
            }
            _ => "<span class=\"muted\">untagged</span>".to_string(),
        };
        let _ =
            writeln!(
            out,
            "<tr><td>{name}</td><td class=\"digest\" title=\"{}\">{}</td><td class=\"num\">{}</td>\
             <td>{}</td><td>{}</td></tr>",
            escape(&digest),
            escape(short(&digest)),
            size(&r["size"]),
            ago(&r["last_used_ms"]),
            if r["pinned"] == Value::Bool(true) { "pinned" } else { "" },
        );
    }
    out.push_str("</tbody></table>\n");
}

/// `sha256:0123456789ab` of a digest.
fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(12, |i| i + 13).min(digest.len());
    digest.get(..end).unwrap_or(digest)
}

/// The overview: the live sections are filled by `app.js`; the store section is rendered here
/// from `/ui/api/store`.
pub fn overview(store: &Value) -> String {
    let mut s = String::new();
    s.push_str("<section id=\"store\"><h2>Store</h2>\n");
    let _ = writeln!(
        s,
        "<p class=\"muted\">{} backend · {} images, {} blobs, {} tags · listed {}</p>",
        esc(&store["backend"]),
        esc(&store["images"]),
        esc(&store["blobs"]),
        esc(&store["tags"]),
        ago(&store["listed_ms"])
    );
    if store["bucket"].is_object() {
        let b = &store["bucket"];
        let label = format!("Bucket {}", text(&b["bucket"]));
        usage_meter(&mut s, &label, &b["used_bytes"], &b["max_bytes"]);
        let t = &store["local_tier"];
        usage_meter(&mut s, "Local tier", &t["used_bytes"], &t["max_bytes"]);
    } else {
        usage_meter(&mut s, "Used", &store["used_bytes"], &store["max_bytes"]);
    }
    match store["last_eviction"].as_object() {
        Some(e) => {
            let _ = writeln!(
                s,
                "<p>Last eviction {}: {} blobs, {}</p>",
                ago(&e["at_ms"]),
                esc(&e["blobs"]),
                size(&e["bytes"])
            );
        }
        None => s.push_str("<p class=\"muted\">No eviction since start.</p>\n"),
    }
    if let Some(c) = store["cluster"].as_object() {
        let _ = writeln!(
            s,
            "<h3>Replicas</h3><p class=\"muted\">this replica: {} · {} healthy peers</p>\
             <table><thead><tr><th>Member</th><th>Health</th></tr></thead><tbody>",
            esc(&c["replica"]),
            esc(&c["healthy_peers"])
        );
        for m in c["members"].as_array().into_iter().flatten() {
            let me = if m["this_replica"] == Value::Bool(true) {
                " (this one)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "<tr><td>{}{me}</td><td class=\"health-{}\">{}</td></tr>",
                esc(&m["url"]),
                esc(&m["health"]),
                esc(&m["health"])
            );
        }
        s.push_str("</tbody></table>\n");
    }
    s.push_str("<div class=\"columns\"><div>\n");
    image_table(&mut s, "Largest images", &store["largest"]);
    s.push_str("</div><div>\n");
    image_table(&mut s, "Least recently used", &store["least_recently_used"]);
    s.push_str("</div></div>\n<h3>Pins</h3>\n");
    let pins = store["pins"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if pins.is_empty() {
        s.push_str("<p class=\"empty\">no pins</p>\n");
    } else {
        s.push_str("<ul class=\"pins\">\n");
        for p in pins {
            let _ = writeln!(
                s,
                "<li>{} <span class=\"muted\">({}{})</span></li>",
                esc(&p["reference"]),
                esc(&p["source"]),
                if p["stored"] == Value::Bool(true) {
                    ", stored"
                } else {
                    ", not stored"
                }
            );
        }
        s.push_str("</ul>\n");
    }
    s.push_str("</section>\n");
    INDEX_HTML.replace("{{store}}", &s)
}

/// A platform object as `os/architecture/variant`.
fn platform(p: &Value) -> String {
    ["os", "architecture", "variant"]
        .iter()
        .filter_map(|k| p.get(*k).map(text))
        .collect::<Vec<_>>()
        .join("/")
}

fn parts_table(out: &mut String, m: &Value) {
    let mut rows: Vec<(&str, &Value)> = Vec::new();
    if m["config"].is_object() {
        rows.push(("config", &m["config"]));
    }
    for l in m["layers"].as_array().into_iter().flatten() {
        rows.push(("layer", l));
    }
    if rows.is_empty() {
        out.push_str("<p class=\"empty\">manifest not stored</p>\n");
        return;
    }
    out.push_str(
        "<table><thead><tr><th></th><th>Digest</th><th>Media type</th><th class=\"num\">Size</th>\
         <th>Stored</th></tr></thead><tbody>\n",
    );
    for (what, d) in rows {
        let _ =
            writeln!(
            out,
            "<tr><td>{what}</td><td class=\"digest\">{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td>{}</td></tr>",
            esc(&d["digest"]),
            esc(&d["media_type"]),
            size(&d["size"]),
            if d["stored"] == Value::Bool(true) { "yes" } else { "no" }
        );
    }
    out.push_str("</tbody></table>\n");
}

/// The image page, from `/ui/api/image`.
pub fn image(img: &Value) -> String {
    let title = format!(
        "{}/{}{}{}",
        text(&img["upstream"]),
        text(&img["repository"]),
        if img["reference"].as_str().is_some_and(|r| r.contains(':')) {
            "@"
        } else {
            ":"
        },
        text(&img["reference"])
    );
    let mut s = String::new();
    let tags: Vec<String> = img["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(esc)
        .collect();
    let _ = writeln!(
        s,
        "<dl class=\"facts\"><dt>Digest</dt><dd class=\"digest\">{}</dd>\
         <dt>Media type</dt><dd>{}</dd><dt>Size in store</dt><dd>{}</dd>\
         <dt>Last used</dt><dd>{}</dd><dt>Pinned</dt><dd>{}</dd><dt>Tags</dt><dd>{}</dd></dl>",
        esc(&img["digest"]),
        esc(&img["media_type"]),
        size(&img["size"]),
        ago(&img["last_used_ms"]),
        if img["pinned"] == Value::Bool(true) {
            "yes"
        } else {
            "no"
        },
        if tags.is_empty() {
            "-".to_string()
        } else {
            tags.join(", ")
        }
    );
    let manifests = img["manifests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if img["index"] == Value::Bool(true) {
        let _ = writeln!(s, "<h2>Platforms ({})</h2>", manifests.len());
    }
    for m in manifests {
        let heading = match m["platform"].is_object() {
            true => platform(&m["platform"]),
            false => "Manifest".to_string(),
        };
        let _ = writeln!(
            s,
            "<section class=\"manifest\"><h3>{}</h3><p class=\"muted digest\">{} · {} · {}</p>",
            escape(&heading),
            esc(&m["digest"]),
            esc(&m["media_type"]),
            size(&m["size"])
        );
        parts_table(&mut s, m);
        s.push_str("</section>\n");
    }
    IMAGE_HTML
        .replace("{{title}}", &escape(&title))
        .replace("{{body}}", &s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_content_and_both_quotes() {
        assert_eq!(
            escape(r#"<a href="x" onclick='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn a_platform_from_an_upstream_is_escaped_on_the_image_page() {
        let img = serde_json::json!({
            "upstream": "up", "repository": "team/app", "reference": "v1", "index": true,
            "digest": "sha256:00", "tags": ["v1"],
            "manifests": [{"digest": "sha256:11", "platform": {"os": "<script>x()</script>",
                "architecture": "amd64"}, "media_type": "a\"b"}],
        });
        let html = image(&img);
        assert!(!html.contains("<script>x()"), "{html}");
        assert!(html.contains("&lt;script&gt;x()&lt;/script&gt;/amd64"));
        assert!(html.contains("a&quot;b"));
    }
}
