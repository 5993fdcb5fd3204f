/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Wire format of the paravirtual cache-flush device.
 *
 * The normative text is resources/cache-flush-device.md; the Rust half is the
 * cache-flush-abi crate (devices/abi/src/cache_flush.rs).  Both sides must
 * agree byte for byte: devices/abi/tests/c_header.rs compiles this header and
 * compares every size, offset and constant with the crate.
 *
 * Usable from the kernel and from user space: it needs only <linux/types.h>.
 * All fields are little-endian.
 */
#ifndef _VIRTIO_CACHE_FLUSH_H
#define _VIRTIO_CACHE_FLUSH_H

#include <linux/types.h>

/* No ID is assigned by OASIS; see the spec, section 1. */
#define VIRTIO_ID_CACHE_FLUSH		0xEFBF

/* Feature bits. */
#define VIRTIO_CACHE_FLUSH_F_RANGE	0	/* FLUSH_RANGE served */
#define VIRTIO_CACHE_FLUSH_F_FULL	1	/* FLUSH_ALL served */
#define VIRTIO_CACHE_FLUSH_F_VERSION_1	32	/* VIRTIO_F_VERSION_1 */

#define VIRTIO_CACHE_FLUSH_MAX_QUEUES	32
#define VIRTIO_CACHE_FLUSH_QUEUE_SIZE_MAX 256

/* Offset of struct virtio_cache_flush_config in the virtio-mmio window. */
#define VIRTIO_CACHE_FLUSH_CONFIG_OFFSET 0x100

/* Device configuration space, read-only, fixed when the device is created. */
struct virtio_cache_flush_config {
	__le32 cache_line_size;
	__le32 num_queues;
	__le32 max_segments;
	__le32 reserved0;
	__le64 max_bytes;
	__le64 full_flush_cost_ns;
	__le64 full_break_even_bytes;
	__le64 full_per_sec_limit;
	__le64 range_bytes_per_sec_limit;
};

/* Request types (struct virtio_cache_flush_req_header.type). */
#define VIRTIO_CACHE_FLUSH_T_RANGE	1
#define VIRTIO_CACHE_FLUSH_T_ALL	2

/* First bytes of every request (device-readable). */
struct virtio_cache_flush_req_header {
	__le32 type;
	__le32 flags;	/* must be 0 */
	__le64 tag;	/* opaque; echoed in host logs */
};

/* One guest-physical extent of a FLUSH_RANGE (device-readable). */
struct virtio_cache_flush_segment {
	__le64 addr;
	__le64 len;	/* at least 1 */
};

/* Status byte, the first device-writable byte of a request. */
#define VIRTIO_CACHE_FLUSH_S_OK			0
#define VIRTIO_CACHE_FLUSH_S_INVALID		1
#define VIRTIO_CACHE_FLUSH_S_UNSUPPORTED	2
#define VIRTIO_CACHE_FLUSH_S_OUT_OF_RANGE	3
#define VIRTIO_CACHE_FLUSH_S_TOO_LARGE		4
#define VIRTIO_CACHE_FLUSH_S_BUSY		5
#define VIRTIO_CACHE_FLUSH_S_HOST_ERROR		6

#endif /* _VIRTIO_CACHE_FLUSH_H */
