//! `soulbox sandbox exec` and `soulbox sandbox shell`: envd process API clients.
//!
//! Both find the sandbox's `envdAccessToken` through the control plane (`GET /sandboxes/{id}`)
//! and then talk to envd through the sandbox gateway (`E2B_SANDBOX_URL`) with the routing
//! headers, as the SDKs do.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use soulbox_client::envd::{CallOptions, EnvdClient, MessageStream};
use soulbox_client::rest::RestClient;
use soulbox_wire::envd::process::{self as pb, process_event, process_input};

/// Where envd traffic goes and who runs the command.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// Sandbox ID.
    pub id: String,
    /// Sandbox-traffic URL of the server (the gateway).
    #[arg(long, env = "E2B_SANDBOX_URL", default_value = "http://127.0.0.1:3001")]
    pub sandbox_url: String,
    /// The sandbox's envd access token; skips looking it up through the control plane
    /// (e.g. to talk to a development agent directly: `--sandbox-url http://127.0.0.1:49983
    /// --access-token ''`).
    #[arg(long)]
    pub access_token: Option<String>,
    /// Linux user in the sandbox (default: the sandbox's default user).
    #[arg(long, short)]
    pub user: Option<String>,
    /// Working directory in the sandbox.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variable `KEY=VALUE` (repeatable).
    #[arg(long = "env", short, value_parser = key_value)]
    pub env: Vec<(String, String)>,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Kill the command after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Command line, run through `bash -l -c` (several words are joined with spaces).
    #[arg(trailing_var_arg = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(clap::Args)]
pub struct ShellArgs {
    #[command(flatten)]
    pub target: TargetArgs,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    crate::async_runtime(false)
}

/// An envd client for the sandbox, with its access token from the control plane.
async fn envd(
    target: &TargetArgs,
    (api_url, api_key): &(String, Option<String>),
) -> anyhow::Result<EnvdClient> {
    let token = match &target.access_token {
        Some(t) => Some(t.clone()),
        None => {
            let key = api_key
                .as_deref()
                .context("no API key: pass --api-key or set E2B_API_KEY")?;
            RestClient::new(api_url, key)?
                .get(&target.id)
                .await
                .with_context(|| format!("looking up sandbox {}", target.id))?
                .envd_access_token
        }
    };
    let mut client = EnvdClient::new(&target.sandbox_url)?.sandbox(&target.id);
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        client = client.access_token(&token);
    }
    Ok(client)
}

fn config(
    target: &TargetArgs,
    args: Vec<String>,
    extra_env: &[(&str, String)],
) -> pb::ProcessConfig {
    let mut envs: std::collections::HashMap<String, String> = extra_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    envs.extend(target.env.iter().cloned());
    pb::ProcessConfig {
        cmd: "/bin/bash".into(),
        args,
        envs,
        cwd: target.cwd.clone(),
    }
}

/// Exit status for our own process: the command's code, 128 + signal like a shell.
fn exit_code(end: &process_event::EndEvent) -> i32 {
    if end.exited {
        return end.exit_code;
    }
    const SIGNALS: [(&str, i32); 4] = [
        ("killed", 9),
        ("terminated", 15),
        ("interrupt", 2),
        ("hangup", 1),
    ];
    SIGNALS
        .iter()
        .find(|(name, _)| end.status.ends_with(name))
        .map_or(1, |(_, n)| 128 + n)
}

pub fn exec(args: ExecArgs, api: (String, Option<String>)) -> anyhow::Result<()> {
    let code = runtime()?.block_on(async move {
        let client = envd(&args.target, &api).await?;
        let req = pb::StartRequest {
            process: Some(config(
                &args.target,
                vec!["-l".into(), "-c".into(), args.cmd.join(" ")],
                &[],
            )),
            pty: None,
            tag: None,
            stdin: Some(false),
        };
        let opts = CallOptions {
            user: args.target.user.clone(),
            timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
            keepalive: Some(Duration::from_secs(30)),
        };
        let stream = client
            .start(&req, &opts)
            .await
            .context("starting the command")?;
        pump(stream, |out| {
            // A closed stdout (`| head`) is not an error of the command.
            let _ = match out {
                process_event::data_event::Output::Stdout(b)
                | process_event::data_event::Output::Pty(b) => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&b).and_then(|()| o.flush())
                }
                process_event::data_event::Output::Stderr(b) => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&b).and_then(|()| e.flush())
                }
            };
        })
        .await
    })?;
    std::process::exit(code)
}

/// Reads a process stream to its end, handing output to `out`; returns our exit code.
async fn pump(
    mut stream: MessageStream<pb::StartResponse>,
    mut out: impl FnMut(process_event::data_event::Output),
) -> anyhow::Result<i32> {
    while let Some(msg) = stream.next().await {
        let msg = msg.context("command stream")?;
        match msg.event.and_then(|e| e.event) {
            Some(process_event::Event::Data(d)) => {
                if let Some(o) = d.output {
                    out(o);
                }
            }
            Some(process_event::Event::End(end)) => return Ok(exit_code(&end)),
            _ => {}
        }
    }
    bail!("the command stream ended without an end event")
}

/// The local terminal's size (cols, rows), if stdout is a terminal.
fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Puts the local terminal in raw mode and restores it when dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("stdin is not a terminal")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("entering raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

pub fn shell(args: ShellArgs, api: (String, Option<String>)) -> anyhow::Result<()> {
    let code = runtime()?.block_on(async move {
        let client = envd(&args.target, &api).await?;
        let (cols, rows) = terminal_size().unwrap_or((80, 24));
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
        let req = pb::StartRequest {
            process: Some(config(
                &args.target,
                vec!["-i".into(), "-l".into()],
                &[
                    ("TERM", term),
                    ("LANG", "C.UTF-8".into()),
                    ("LC_ALL", "C.UTF-8".into()),
                ],
            )),
            pty: Some(pb::Pty {
                size: Some(pb::pty::Size {
                    cols: u32::from(cols),
                    rows: u32::from(rows),
                }),
            }),
            tag: None,
            stdin: None,
        };
        let opts = CallOptions {
            user: args.target.user.clone(),
            timeout: None,
            keepalive: Some(Duration::from_secs(30)),
        };
        let mut stream = client
            .start(&req, &opts)
            .await
            .context("starting the shell")?;
        let pid = match stream.next().await {
            Some(Ok(pb::StartResponse {
                event:
                    Some(pb::ProcessEvent {
                        event: Some(process_event::Event::Start(s)),
                    }),
            })) => s.pid,
            Some(Err(e)) => return Err(e).context("starting the shell"),
            _ => bail!("the shell stream did not start with a start event"),
        };
        let raw = RawMode::enter()?;

        // Keystrokes: a blocking reader thread feeds SendInput.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut std::io::stdin().lock(), &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let input_client = client.clone();
        let input = tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                if input_client
                    .send_input(pid, process_input::Input::Pty(data))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let resize_client = client.clone();
        let resizer = tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = terminal_size() {
                    let _ = resize_client
                        .resize(pid, u32::from(cols), u32::from(rows))
                        .await;
                }
            }
        });
        let result = pump(stream, |out| {
            let (process_event::data_event::Output::Pty(b)
            | process_event::data_event::Output::Stdout(b)
            | process_event::data_event::Output::Stderr(b)) = out;
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(&b).and_then(|()| o.flush());
        })
        .await;
        input.abort();
        resizer.abort();
        drop(raw);
        result
    })?;
    std::process::exit(code)
}
