//! TUN devices (`ip tuntap add NAME mode tun`), for the udp backend's
//! `flannel0`: the daemon reads and writes raw IP packets on the device fd.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::{check_ifname, Error, Result};

/// An open TUN device. The device lives as long as this handle (it is not
/// persistent), so a crashed daemon leaves no `flannel0` behind.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    /// `ip tuntap add NAME mode tun` (no packet-info header: each read or
    /// write is exactly one IP packet), in the calling thread's namespace.
    /// Opening an existing non-persistent TUN device of that name fails with
    /// EBUSY while another process holds it.
    pub fn open(name: &str) -> Result<Tun> {
        let op = format!("ip tuntap add {name} mode tun");
        check_ifname(&op, "tun device name", name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| Error::Kernel {
                op: format!("{op}: open /dev/net/tun"),
                source,
            })?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(Error::Kernel {
                op,
                source: std::io::Error::last_os_error(),
            });
        }
        // The kernel writes back the name it used (the same, since we gave one).
        let used: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(Tun {
            file,
            name: String::from_utf8_lossy(&used).into_owned(),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The packet file: `read` returns one IP packet, `write` sends one.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives up the handle; the device goes when the file is closed.
    pub fn into_file(self) -> File {
        self.file
    }
}
