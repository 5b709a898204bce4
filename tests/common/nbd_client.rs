//! A small blocking NBD client (fixed newstyle, NBD_OPT_GO, simple replies)
//! for tests that must know exactly which writes and flushes were acknowledged.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

pub struct NbdClient {
    s: UnixStream,
    pub size: u64,
    handle: u64,
}

fn err(msg: String) -> io::Error {
    io::Error::other(msg)
}

fn u64_of(s: &mut UnixStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn u32_of(s: &mut UnixStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

impl NbdClient {
    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        if u64_of(&mut s)? != NBDMAGIC || u64_of(&mut s)? != IHAVEOPT {
            return Err(err("not an NBD newstyle server".into()));
        }
        let mut f = [0u8; 2];
        s.read_exact(&mut f)?;
        let server_flags = u16::from_be_bytes(f);
        let no_zeroes = server_flags & 2 != 0;
        let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        s.write_all(&client_flags.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            if u64_of(&mut s)? != REPLY_MAGIC {
                return Err(err("bad option reply magic".into()));
            }
            let _opt = u32_of(&mut s)?;
            let kind = u32_of(&mut s)?;
            let len = u32_of(&mut s)?;
            if len > 1 << 16 {
                return Err(err(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 10 && data[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => {
                    return Err(err(format!(
                        "export {export} refused: {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                _ => {}
            }
        }
        Ok(NbdClient {
            s,
            size: size.ok_or_else(|| err("no export size".into()))?,
            handle: 0,
        })
    }

    fn request(&mut self, cmd: u16, off: u64, len: u32, data: &[u8]) -> io::Result<()> {
        self.handle += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.handle.to_be_bytes());
        h.extend_from_slice(&off.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.s.write_all(&h)
    }

    fn reply(&mut self) -> io::Result<()> {
        if u32_of(&mut self.s)? != SIMPLE_REPLY_MAGIC {
            return Err(err("bad reply magic".into()));
        }
        let e = u32_of(&mut self.s)?;
        let h = u64_of(&mut self.s)?;
        if h != self.handle {
            return Err(err(format!(
                "reply for handle {h}, expected {}",
                self.handle
            )));
        }
        if e != 0 {
            return Err(err(format!("server error {e}")));
        }
        Ok(())
    }

    pub fn write(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        self.request(CMD_WRITE, off, data.len() as u32, data)?;
        self.reply()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply()
    }

    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.request(CMD_READ, off, buf.len() as u32, &[])?;
        self.reply()?;
        self.s.read_exact(buf)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}
