//! Moves an image directory from the source namespace to the destination's over the shaped
//! link, as `tar | ssh host tar` does in `scripts/ckpt-migrate`, without ssh's cipher.
//!
//! Each side is a thread that entered its namespace with `setns`: a socket belongs to the
//! namespace its creator was in, so the bytes really cross the veth pair and its `tbf`.
//! Frames: `u32 name length, name, u8 kind (0 file, 1 symlink), u64 length, bytes`; a zero name
//! length ends the stream, and the receiver answers one byte once everything is on its disk, so
//! the time measured is the time to the destination, not to the sender's socket buffer.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sched::CloneFlags;

/// Runs `f` on a thread that lives in the network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = File::open(&ns).with_context(|| format!("open {}", ns.display()))?;
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {}", ns.display()))?;
        f()
    })
}

/// Copies the files and symlinks of `from` (flat, as image directories are) into `to`, over
/// `addr` (the destination's address), and returns the payload bytes.
pub fn copy_dir(
    src_ns: &Path,
    dst_ns: &Path,
    from: &Path,
    to: &Path,
    addr: SocketAddr,
) -> Result<u64> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    let to = to.to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = in_netns(dst_ns, move || {
        let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"));
        let _ = ready_tx.send(listener.is_ok());
        receive(&listener?, &to)
    });
    if !ready_rx.recv().unwrap_or(false) {
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
        bail!("the receiver stopped before listening");
    }
    let from = from.to_path_buf();
    let sender = in_netns(src_ns, move || send(&from, addr));
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    let sent = sent.context("send images")?;
    received.context("receive images")?;
    Ok(sent)
}

fn send(from: &Path, addr: SocketAddr) -> Result<u64> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let mut out = BufWriter::with_capacity(1 << 20, &stream);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(from)
        .with_context(|| format!("list {}", from.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("list {}", from.display()))?;
    entries.sort();
    let mut total = 0u64;
    for path in entries {
        let meta =
            std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        // The tools' logs stay where they were written (a lazy dump is still writing its own).
        if name.ends_with(b".log") {
            continue;
        }
        let name_len = u32::try_from(name.len()).context("file name length")?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("readlink {}", path.display()))?;
            let target = target.as_os_str().as_encoded_bytes().to_vec();
            out.write_all(&name_len.to_le_bytes())?;
            out.write_all(&name)?;
            out.write_all(&[1])?;
            out.write_all(&(target.len() as u64).to_le_bytes())?;
            out.write_all(&target)?;
        } else if meta.is_file() {
            out.write_all(&name_len.to_le_bytes())?;
            out.write_all(&name)?;
            out.write_all(&[0])?;
            out.write_all(&meta.len().to_le_bytes())?;
            let mut file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            let copied = std::io::copy(&mut (&mut file).take(meta.len()), &mut out)
                .with_context(|| format!("send {}", path.display()))?;
            if copied != meta.len() {
                bail!("{} shrank while being sent", path.display());
            }
            total += copied;
        }
    }
    out.write_all(&0u32.to_le_bytes())?;
    out.flush().context("send images")?;
    drop(out);
    let mut ack = [0u8; 1];
    (&stream)
        .read_exact(&mut ack)
        .context("wait for the receiver's acknowledgement")?;
    Ok(total)
}

fn receive(listener: &TcpListener, to: &Path) -> Result<()> {
    let (stream, _) = listener.accept().context("accept")?;
    let mut input = BufReader::with_capacity(1 << 20, &stream);
    loop {
        let mut word = [0u8; 4];
        input.read_exact(&mut word).context("read frame")?;
        let name_len = u32::from_le_bytes(word);
        if name_len == 0 {
            break;
        }
        if name_len > 4096 {
            bail!("file name of {name_len} bytes");
        }
        let mut name = vec![0u8; usize::try_from(name_len).context("name length")?];
        input.read_exact(&mut name).context("read name")?;
        let name = String::from_utf8(name).context("file name is not UTF-8")?;
        if name.contains('/') || name == ".." || name == "." {
            bail!("refusing file name {name:?}");
        }
        let mut kind = [0u8; 1];
        input.read_exact(&mut kind).context("read kind")?;
        let mut len = [0u8; 8];
        input.read_exact(&mut len).context("read length")?;
        let len = u64::from_le_bytes(len);
        let path = to.join(&name);
        match kind[0] {
            0 => {
                let mut file =
                    File::create(&path).with_context(|| format!("create {}", path.display()))?;
                let copied = std::io::copy(&mut (&mut input).take(len), &mut file)
                    .with_context(|| format!("write {}", path.display()))?;
                if copied != len {
                    bail!("{name}: stream ended after {copied} of {len} bytes");
                }
            }
            1 => {
                if len > 4096 {
                    bail!("symlink target of {len} bytes");
                }
                let mut target = vec![0u8; usize::try_from(len).context("symlink length")?];
                input.read_exact(&mut target).context("read symlink")?;
                let target = String::from_utf8(target).context("symlink is not UTF-8")?;
                // A page server may have made the same link already.
                let _ = std::fs::remove_file(&path);
                std::os::unix::fs::symlink(&target, &path)
                    .with_context(|| format!("symlink {}", path.display()))?;
            }
            other => bail!("unknown entry kind {other}"),
        }
    }
    (&stream).write_all(&[1]).context("acknowledge")?;
    Ok(())
}
