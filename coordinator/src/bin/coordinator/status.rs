//! `coordinator status`: shows a running coordinator's run (phase, rounds, nodes, accuracy).

use std::time::Duration;

use clap::Args;

use crate::args::ClientArgs;

/// The flags of `coordinator status`.
#[derive(Args)]
pub(crate) struct StatusArgs {
    /// The coordinator's HTTP address (`http.listen`): http://… or https://….
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[command(flatten)]
    client: ClientArgs,
    /// Print the JSON of /api/status instead of tables.
    #[arg(long)]
    json: bool,
    /// Refresh every this many seconds until the run finishes (0: once).
    #[arg(long, default_value_t = 0)]
    watch: u64,
}

/// Runs `coordinator status` with `args`.
pub(crate) async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let StatusArgs {
        url,
        client,
        json,
        watch,
    } = args;
    loop {
        let base = url.clone();
        let opts = client.options(Duration::from_secs(5))?;
        let status = tokio::task::spawn_blocking(move || coordinator::api::http::fetch_status(&base, &opts)).await??;
        let text = if json {
            serde_json::to_string_pretty(&status)? + "\n"
        } else {
            coordinator::api::http::render_status(&status, coordinator::runtime::driver::now_ms())
        };
        let mut out = std::io::stdout().lock();
        if watch > 0 {
            // Clear the terminal and redraw.
            std::io::Write::write_all(&mut out, b"\x1b[2J\x1b[H")?;
        }
        std::io::Write::write_all(&mut out, text.as_bytes())?;
        drop(out);
        if watch == 0 || status.phase == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_secs(watch)).await;
    }
    Ok(())
}
