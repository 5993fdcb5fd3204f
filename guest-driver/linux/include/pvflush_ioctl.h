/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note OR Apache-2.0) */
/*
 * User-space interface of the virtio cache-flush driver: the misc device
 * /dev/pvflush (mode 0600: every request pauses the whole VM).
 *
 * Every ioctl returns 0 or -1 with errno:
 *   EFAULT   the argument pointer, or a page of the range, is not readable
 *            user memory (unmapped, PROT_NONE, kernel address); the pages
 *            of the range before that one may have been flushed
 *   EINVAL   addr + len wraps around
 *   EBUSY    the host's rate limit refused the request, also after retries;
 *            nothing more was flushed
 *   EOPNOTSUPP  FLUSH_ALL where the device does not offer it
 *   ERANGE   the host found an address outside guest RAM
 *   ETIMEDOUT, EIO  the device did not answer, failed, or needs a reset
 *   ENODEV   the device went away
 *   ENOTTY   unknown ioctl
 */
#ifndef _PVFLUSH_IOCTL_H
#define _PVFLUSH_IOCTL_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* A range of the caller's own virtual memory.  len 0 does nothing. */
struct pvflush_range {
	__u64 addr;
	__u64 len;
};

/* The device's configuration and the driver's counters, CPU byte order. */
struct pvflush_info {
	__u32 cache_line_size;
	__u32 num_queues;		/* offered by the device */
	__u32 max_segments;		/* per request, offered by the device */
	__u32 queues_used;		/* queues the driver set up */
	__u32 segments_per_request;	/* what the driver sends at most */
	__u32 reserved;
	__u64 features;			/* negotiated */
	__u64 max_bytes;
	__u64 full_flush_cost_ns;
	__u64 full_break_even_bytes;
	__u64 full_per_sec_limit;
	__u64 range_bytes_per_sec_limit;
	/* Counters since the driver bound the device. */
	__u64 requests;			/* completed with OK */
	__u64 segments;			/* in those requests */
	__u64 bytes;			/* in those requests */
	__u64 busy;			/* BUSY answers */
	__u64 failed;			/* any other non-OK outcome */
};

/*
 * Code 0xCF, numbers 0x80-0x82: ioctl-number.rst gives only 0xCF 02 to
 * cifs, so this block cannot be confused with an in-tree ioctl.
 */
#define PVFLUSH_IOC_MAGIC	0xCF
#define PVFLUSH_IOC_INFO	_IOR(PVFLUSH_IOC_MAGIC, 0x80, struct pvflush_info)
#define PVFLUSH_IOC_FLUSH_RANGE	_IOW(PVFLUSH_IOC_MAGIC, 0x81, struct pvflush_range)
#define PVFLUSH_IOC_FLUSH_ALL	_IO(PVFLUSH_IOC_MAGIC, 0x82)

#endif /* _PVFLUSH_IOCTL_H */
