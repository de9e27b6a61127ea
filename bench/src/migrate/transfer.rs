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

/// A connection from the source to the destination, opened before it is needed (as an ssh
/// connection a user's script keeps open), waiting for the directory to send: it copies the
/// files and symlinks of that directory (flat, as image directories are) to the destination's
/// directory.
pub struct Link {
    go: std::sync::mpsc::Sender<PathBuf>,
    sender: std::thread::JoinHandle<Result<u64>>,
    receiver: std::thread::JoinHandle<Result<()>>,
}

impl Link {
    /// Connects; the destination will write into `to`. Dropping the link unsent ends both
    /// sides (the sender gives up, the receiver sees the connection close).
    /// `compress`: zlib at its fastest level on the wire, as `ssh -C` on a slow link.
    pub fn open(
        src_ns: &Path,
        dst_ns: &Path,
        to: &Path,
        addr: SocketAddr,
        compress: bool,
    ) -> Result<Link> {
        std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
        let to = to.to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = in_netns(dst_ns, move || {
            // The destination's half (see `workload::Placement`).
            super::workload::Placement::Destination.apply()?;
            let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"));
            let _ = ready_tx.send(listener.is_ok());
            receive(&listener?, &to, compress)
        });
        if !ready_rx.recv().unwrap_or(false) {
            receiver
                .join()
                .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
            bail!("the receiver stopped before listening");
        }
        let (go, go_rx) = std::sync::mpsc::channel::<PathBuf>();
        let (connected_tx, connected_rx) = std::sync::mpsc::channel();
        let sender = in_netns(src_ns, move || {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .with_context(|| format!("connect to {addr}"));
            let _ = connected_tx.send(stream.is_ok());
            let stream = stream?;
            stream.set_nodelay(true).context("TCP_NODELAY")?;
            let from = go_rx
                .recv()
                .context("the transfer was called off before it began")?;
            send(&stream, &from, compress)
        });
        if !connected_rx.recv().unwrap_or(false) {
            let sent = sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
            sent.context("connect for the transfer")?;
            bail!("the sender stopped before connecting");
        }
        Ok(Link {
            go,
            sender,
            receiver,
        })
    }

    /// Sends `from` and waits until the destination has all of it on its disk.
    pub fn send(self, from: &Path) -> Result<u64> {
        self.go
            .send(from.to_path_buf())
            .map_err(|_| anyhow::anyhow!("the sender is gone"))?;
        let sent = self
            .sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
        let received = self
            .receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
        let sent = sent.context("send images")?;
        received.context("receive images")?;
        Ok(sent)
    }
}

fn send(stream: &TcpStream, from: &Path, compress: bool) -> Result<u64> {
    let out = BufWriter::with_capacity(1 << 20, stream);
    let total = if compress {
        let mut z = flate2::write::ZlibEncoder::new(out, flate2::Compression::fast());
        let total = send_entries(&mut z, from)?;
        z.finish()
            .and_then(|mut out| out.flush())
            .context("send images")?;
        total
    } else {
        let mut out = out;
        let total = send_entries(&mut out, from)?;
        out.flush().context("send images")?;
        total
    };
    // The end of our half: a decompressing receiver may hold decoded bytes back until it
    // sees that no more input comes.
    stream
        .shutdown(std::net::Shutdown::Write)
        .context("end the image stream")?;
    let mut ack = [0u8; 1];
    let mut stream = stream;
    stream
        .read_exact(&mut ack)
        .context("wait for the receiver's acknowledgement")?;
    Ok(total)
}

/// Writes the frames of every file and symlink of `from`; returns the payload bytes.
fn send_entries(out: &mut impl Write, from: &Path) -> Result<u64> {
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
            let copied = std::io::copy(&mut (&mut file).take(meta.len()), out)
                .with_context(|| format!("send {}", path.display()))?;
            if copied != meta.len() {
                bail!("{} shrank while being sent", path.display());
            }
            total += copied;
        }
    }
    out.write_all(&0u32.to_le_bytes())?;
    Ok(total)
}

fn receive(listener: &TcpListener, to: &Path, compress: bool) -> Result<()> {
    let (stream, _) = listener.accept().context("accept")?;
    let input = BufReader::with_capacity(1 << 20, &stream);
    if compress {
        receive_entries(&mut flate2::bufread::ZlibDecoder::new(input), to)?;
    } else {
        receive_entries(&mut { input }, to)?;
    }
    (&stream).write_all(&[1]).context("acknowledge")?;
    Ok(())
}

/// Reads frames into `to` until the end frame.
fn receive_entries(input: &mut impl Read, to: &Path) -> Result<()> {
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
                let copied = std::io::copy(&mut input.by_ref().take(len), &mut file)
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames and the acknowledgement, plain and compressed, over a loopback connection.
    #[test]
    fn a_directory_crosses_intact() {
        for compress in [false, true] {
            let from = std::env::temp_dir().join(format!(
                "ckb-transfer-{}-{compress}-from",
                std::process::id()
            ));
            let to =
                from.with_file_name(format!("ckb-transfer-{}-{compress}-to", std::process::id()));
            let _ = std::fs::remove_dir_all(&from);
            let _ = std::fs::remove_dir_all(&to);
            std::fs::create_dir_all(&from).expect("mkdir");
            std::fs::create_dir_all(&to).expect("mkdir");
            let mut big = vec![0u8; 139_264];
            for (i, b) in big.iter_mut().enumerate().step_by(7) {
                *b = (i % 251) as u8;
            }
            std::fs::write(from.join("pages-1.img"), &big).expect("write");
            std::fs::write(from.join("pstree.img"), b"tree").expect("write");
            std::fs::write(from.join("dump.log"), b"stays").expect("write");
            std::os::unix::fs::symlink("../pre1", from.join("parent")).expect("symlink");
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let dest = to.clone();
            let receiver = std::thread::spawn(move || receive(&listener, &dest, compress));
            let stream = TcpStream::connect(addr).expect("connect");
            let sent = send(&stream, &from, compress).expect("send");
            receiver.join().expect("join").expect("receive");
            assert_eq!(sent, big.len() as u64 + 4);
            assert_eq!(std::fs::read(to.join("pages-1.img")).expect("read"), big);
            assert_eq!(std::fs::read(to.join("pstree.img")).expect("read"), b"tree");
            assert!(!to.join("dump.log").exists());
            assert_eq!(
                std::fs::read_link(to.join("parent")).expect("link"),
                Path::new("../pre1")
            );
            let _ = std::fs::remove_dir_all(&from);
            let _ = std::fs::remove_dir_all(&to);
        }
    }
}
