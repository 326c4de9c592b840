//! What a prefetch shows while it runs: progress bars on a terminal, plain lines otherwise; and
//! [`Quiet`], which keeps the embedded server's request log out of them.

use std::cell::RefCell;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Requested;
use crate::oci::Digest;

/// Layers at least this big get their own progress bar on a terminal.
const BIG_BLOB: u64 = 16 << 20;

thread_local! {
    pub(super) static QUIET_GUARD: RefCell<Option<tracing::dispatcher::DefaultGuard>> =
        const { RefCell::new(None) };
}

/// Forwards to the process's subscriber only warnings, errors and prefetch's own events.
pub(super) struct Quiet(pub(super) tracing::Dispatch);

impl Quiet {
    fn lets_through(meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::WARN || meta.target().starts_with(super::LOG_TARGET)
    }
}

impl tracing::Subscriber for Quiet {
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Quiet::lets_through(meta) {
            self.0.register_callsite(meta)
        } else {
            tracing::subscriber::Interest::never()
        }
    }
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        Quiet::lets_through(meta) && self.0.enabled(meta)
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(span)
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        self.0.record(span, values)
    }
    fn record_follows_from(&self, span: &tracing::span::Id, follows: &tracing::span::Id) {
        self.0.record_follows_from(span, follows)
    }
    fn event(&self, event: &tracing::Event<'_>) {
        self.0.event(event)
    }
    fn enter(&self, span: &tracing::span::Id) {
        self.0.enter(span)
    }
    fn exit(&self, span: &tracing::span::Id) {
        self.0.exit(span)
    }
    fn clone_span(&self, id: &tracing::span::Id) -> tracing::span::Id {
        self.0.clone_span(id)
    }
    fn try_close(&self, id: tracing::span::Id) -> bool {
        self.0.try_close(id)
    }
}

/// Progress: bars on a terminal, plain lines otherwise.
#[derive(Clone)]
pub(super) struct Ui(Arc<UiKind>);

enum UiKind {
    Bars {
        multi: MultiProgress,
        images: ProgressBar,
        bytes: ProgressBar,
    },
    Lines,
}

impl Ui {
    pub(super) fn new(images: u64) -> Ui {
        if !std::io::stdout().is_terminal() {
            return Ui(Arc::new(UiKind::Lines));
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let images = multi.add(
            ProgressBar::new(images)
                .with_style(style("{prefix:>8} [{bar:30}] {pos}/{len} {wide_msg}"))
                .with_prefix("images"),
        );
        let bytes = multi.add(
            ProgressBar::new(0)
                .with_style(style(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
                ))
                .with_prefix("bytes"),
        );
        bytes.enable_steady_tick(Duration::from_millis(250));
        Ui(Arc::new(UiKind::Bars {
            multi,
            images,
            bytes,
        }))
    }

    /// A message: above the bars on a terminal, a plain line otherwise.
    pub(super) fn line(&self, msg: String) {
        match &*self.0 {
            // Blob by blob is too much detail above the bars; they show it.
            UiKind::Bars { .. } => {}
            UiKind::Lines => println!("{msg}"),
        }
    }

    pub(super) fn image_done(&self, label: &str, result: &Result<(), String>, cached: bool) {
        let msg = match result {
            Ok(()) if cached => format!("{label}: already cached"),
            Ok(()) => format!("{label}: done"),
            Err(e) => format!("{label}: FAILED: {e}"),
        };
        match &*self.0 {
            UiKind::Bars { multi, images, .. } => {
                images.inc(1);
                if result.is_err() {
                    let _ = multi.println(msg);
                } else {
                    images.set_message(label.to_string());
                }
            }
            UiKind::Lines => println!("{msg}"),
        }
    }

    /// References refused before anything was fetched.
    pub(super) fn early_failures(&self, requested: &[Requested], failed: &[(usize, String)]) {
        for (i, e) in failed {
            self.image_done(&requested[*i].text, &Err(e.clone()), false);
        }
    }

    pub(super) fn add_total(&self, n: u64) {
        if let UiKind::Bars { bytes, .. } = &*self.0 {
            bytes.inc_length(n);
        }
    }

    pub(super) fn bytes(&self, n: u64) {
        if let UiKind::Bars { bytes, .. } = &*self.0 {
            bytes.inc(n);
        }
    }

    /// A bar of its own for a large blob, on a terminal.
    pub(super) fn blob_bar(&self, digest: &Digest, size: u64) -> Option<ProgressBar> {
        let UiKind::Bars { multi, .. } = &*self.0 else {
            return None;
        };
        if size < BIG_BLOB {
            return None;
        }
        let short = &digest.hex()[..12];
        Some(
            multi.add(
                ProgressBar::new(size)
                    .with_style(style(
                        "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                    ))
                    .with_prefix(short.to_string()),
            ),
        )
    }

    pub(super) fn done_bar(&self, bar: Option<ProgressBar>) {
        if let (UiKind::Bars { multi, .. }, Some(bar)) = (&*self.0, bar) {
            bar.finish_and_clear();
            multi.remove(&bar);
        }
    }

    pub(super) fn finish(&self) {
        if let UiKind::Bars {
            multi,
            images,
            bytes,
        } = &*self.0
        {
            images.finish_and_clear();
            bytes.finish_and_clear();
            let _ = multi.clear();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid progress template")
        .progress_chars("=> ")
}
