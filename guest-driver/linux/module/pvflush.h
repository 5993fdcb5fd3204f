/* SPDX-License-Identifier: GPL-2.0 */
/*
 * In-kernel API of the virtio cache-flush driver (virtio_cache_flush.ko).
 *
 * Both calls write back and invalidate cache lines on every CPU of the VM:
 * the host pauses every vCPU, flushes, completes the request and only then
 * resumes them.  They never sleep (completion is polled), so they may be
 * called with interrupts off or under a spinlock; they spin while the host
 * works (a range request pauses the VM for well under a millisecond plus
 * the flush itself, a full flush for as long as the host needs to flush
 * the guest's resident memory).
 *
 * Return: 0 when every line was flushed, or
 *   -ENODEV      no cache-flush device is bound
 *   -EINVAL      addr + len wraps around
 *   -EBUSY       refused by the host's rate limit; nothing was flushed by
 *                the refused request: try again later
 *   -EOPNOTSUPP  pvflush_wbinv_all() where the device does not offer it
 *   -ERANGE      part of the range is not guest RAM
 *   -ETIMEDOUT, -EIO  the device did not answer, or failed; a reset of
 *                the device is under way or it is out of service
 */
#ifndef _PVFLUSH_H
#define _PVFLUSH_H

#include <linux/types.h>

/* Write back and invalidate every line holding a byte of [addr, addr+len). */
int pvflush_wbinv_range(phys_addr_t addr, size_t len);
/* Write back and invalidate every line of guest memory. */
int pvflush_wbinv_all(void);

#endif /* _PVFLUSH_H */
