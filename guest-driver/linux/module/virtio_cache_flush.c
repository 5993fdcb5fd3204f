// SPDX-License-Identifier: GPL-2.0
/*
 * Driver for the paravirtual cache-flush device (virtio device ID 0xEFBF).
 *
 * The device writes back and invalidates cache lines on every CPU of the
 * VM on request: the host pauses every vCPU, flushes, completes the request
 * and only then resumes them (resources/cache-flush-device.md).
 *
 * Offers:
 *  - pvflush_wbinv_range() and pvflush_wbinv_all() to other modules
 *    (pvflush.h); neither sleeps: completion is polled on the used ring;
 *  - /dev/pvflush, ioctls for user space (pvflush_ioctl.h);
 *  - on kernels with the cache-coherency framework (6.19+,
 *    CONFIG_GENERIC_CPU_CACHE_MAINTENANCE, which 6.19 selects on arm64
 *    only: x86 keeps its own WBINVD-based call) a provider for it, so that
 *    cpu_cache_invalidate_memregion() goes through the device.
 *
 * One queue per CPU, as many as the device offers: a CPU submits on queue
 * (cpu % queues), under that queue's spinlock, with one request in flight
 * per queue.  The host may send no used-buffer interrupts at all, so the
 * queues have no callback and the submitter polls.
 */

#include <linux/atomic.h>
#include <linux/bitops.h>
#include <linux/delay.h>
#include <linux/fs.h>
#include <linux/ktime.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/workqueue.h>

#if IS_ENABLED(CONFIG_GENERIC_CPU_CACHE_MAINTENANCE)
#include <linux/cache_coherency.h>
#endif

#include "virtio_cache_flush.h"
#include "pvflush_ioctl.h"
#include "pvflush.h"

/* Header plus this many segments fill one page: one request buffer per queue. */
#define CFL_SEGS_MAX		254
/* Longer than any host deadline (pause 2 s, flush work 60 s). */
#define CFL_POLL_TIMEOUT_NS	(90ULL * NSEC_PER_SEC)
/*
 * Used-ring polls between two looks at the clock and at Status.  A Status
 * read is an exit to the VMM; a poll is a few loads.
 */
#define CFL_POLL_CHECK_PERIOD	64
/* BUSY: retries, and the first back-off, for callers that may sleep. */
#define CFL_BUSY_RETRIES	5
#define CFL_BUSY_FIRST_MS	10
/* Pages pinned at a time for a user range: 4 MiB, more than one request. */
#define CFL_PIN_PAGES		1024
/* Written before a request; the device writes one of the S_ values. */
#define CFL_STATUS_UNWRITTEN	0xff

struct cfl_request {
	struct virtio_cache_flush_req_header hdr;
	struct virtio_cache_flush_segment segs[CFL_SEGS_MAX];
	u8 status;
};

struct cfl_queue {
	spinlock_t lock;	/* one request in flight on this queue */
	struct virtqueue *vq;
	struct cfl_request *req;
	char name[16];
};

/* Bits of cfl_device.flags: requests are refused while any is set. */
enum {
	CFL_RESET_PENDING,	/* NEEDS_RESET or no answer: reset_work runs */
	CFL_FROZEN,		/* queues torn down (suspend, reset) */
	CFL_BROKEN,		/* a reset failed: out of service */
	CFL_GONE,		/* being removed */
};

struct cfl_device {
	struct virtio_device *vdev;
	struct cfl_queue *queues;
	unsigned int nqueues;
	unsigned long flags;
	struct work_struct reset_work;

	/*
	 * Configuration, read at probe. Only the two full-flush figures change
	 * afterwards: the host refreshes them from every FLUSH_ALL without a
	 * configuration interrupt (spec section 4), so they are re-read on
	 * first use after one (full_stale).
	 */
	u32 line_size;
	u32 dev_queues;
	u32 dev_max_segments;
	u32 segs_per_req;
	u64 max_bytes;
	u64 full_cost_ns;
	u64 break_even;
	atomic_t full_stale;
	u64 full_limit;
	u64 range_limit;
	bool full;

	atomic64_t tag;
	atomic64_t n_requests;
	atomic64_t n_segments;
	atomic64_t n_bytes;
	atomic64_t n_busy;
	atomic64_t n_failed;

#if IS_ENABLED(CONFIG_GENERIC_CPU_CACHE_MAINTENANCE)
	struct cfl_cc *cc;
#endif
};

/*
 * The device behind /dev/pvflush and the exported calls: the first one
 * bound (a VM has one).  Every request runs with cfl_lock held for reading,
 * so a writer (remove, reset) that takes it knows no request uses the
 * device's queues any more.  Writers disable interrupts, since a reader may
 * be an interrupt handler.
 */
static DEFINE_RWLOCK(cfl_lock);
static struct cfl_device *cfl_active;

static void cfl_wait_for_requests(void)
{
	unsigned long irqflags;

	write_lock_irqsave(&cfl_lock, irqflags);
	write_unlock_irqrestore(&cfl_lock, irqflags);
}

static int cfl_status_errno(u8 status)
{
	switch (status) {
	case VIRTIO_CACHE_FLUSH_S_OK:
		return 0;
	case VIRTIO_CACHE_FLUSH_S_INVALID:
		return -EINVAL;
	case VIRTIO_CACHE_FLUSH_S_UNSUPPORTED:
		return -EOPNOTSUPP;
	case VIRTIO_CACHE_FLUSH_S_OUT_OF_RANGE:
		return -ERANGE;
	case VIRTIO_CACHE_FLUSH_S_TOO_LARGE:
		return -E2BIG;
	case VIRTIO_CACHE_FLUSH_S_BUSY:
		return -EBUSY;
	default:	/* HOST_ERROR, or a value the spec does not define */
		return -EIO;
	}
}

/* Resets happen in process context: they tear down and rebuild the queues. */
static void cfl_request_reset(struct cfl_device *cd)
{
	if (test_bit(CFL_GONE, &cd->flags))
		return;
	if (!test_and_set_bit(CFL_RESET_PENDING, &cd->flags))
		schedule_work(&cd->reset_work);
}

/* Spin until the device returns the request on @q; 0 and its used length. */
static int cfl_poll(struct cfl_device *cd, struct cfl_queue *q,
		    unsigned int *len)
{
	u64 deadline = ktime_get_ns() + CFL_POLL_TIMEOUT_NS;
	unsigned int spins = 0;

	for (;;) {
		if (virtqueue_get_buf(q->vq, len))
			return 0;
		if (virtqueue_is_broken(q->vq))
			return -EIO;
		if (++spins % CFL_POLL_CHECK_PERIOD == 0) {
			u8 status = cd->vdev->config->get_status(cd->vdev);

			if (status & VIRTIO_CONFIG_S_NEEDS_RESET) {
				dev_err_ratelimited(&cd->vdev->dev,
						    "device needs a reset; request abandoned\n");
				return -EIO;
			}
			if (ktime_get_ns() > deadline) {
				dev_err_ratelimited(&cd->vdev->dev,
						    "no answer within %llu s; resetting the device\n",
						    CFL_POLL_TIMEOUT_NS / NSEC_PER_SEC);
				return -ETIMEDOUT;
			}
		}
		cpu_relax();
	}
}

/*
 * Send one request and wait for its status.  Called with cfl_lock held for
 * reading; never sleeps.
 */
static int cfl_submit(struct cfl_device *cd, u32 type,
		      const struct virtio_cache_flush_segment *segs,
		      unsigned int nsegs, u64 bytes)
{
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	struct cfl_queue *q;
	struct cfl_request *r;
	unsigned long irqflags;
	unsigned int len = 0;
	u8 status = CFL_STATUS_UNWRITTEN;
	u64 tag;
	int ret;

	if (cd->flags & (BIT(CFL_RESET_PENDING) | BIT(CFL_FROZEN) |
			 BIT(CFL_BROKEN) | BIT(CFL_GONE)))
		return -EIO;
	if (WARN_ON_ONCE(nsegs > cd->segs_per_req))
		return -E2BIG;

	tag = atomic64_inc_return(&cd->tag);
	q = &cd->queues[raw_smp_processor_id() % cd->nqueues];
	spin_lock_irqsave(&q->lock, irqflags);
	r = q->req;
	r->hdr.type = cpu_to_le32(type);
	r->hdr.flags = 0;
	r->hdr.tag = cpu_to_le64(tag);
	if (nsegs)
		memcpy(r->segs, segs, nsegs * sizeof(*segs));
	r->status = CFL_STATUS_UNWRITTEN;
	sg_init_one(&out, &r->hdr, sizeof(r->hdr) + nsegs * sizeof(*segs));
	sg_init_one(&in, &r->status, sizeof(r->status));

	ret = virtqueue_add_sgs(q->vq, sgs, 1, 1, r, GFP_ATOMIC);
	if (!ret) {
		virtqueue_kick(q->vq);
		ret = cfl_poll(cd, q, &len);
		if (ret)
			/* The request may still be in the ring: reset drops it. */
			cfl_request_reset(cd);
		else if (len < 1)
			ret = -EIO;	/* the device could not write a status */
		else
			status = r->status;
	}
	if (!ret && len >= 1)
		ret = cfl_status_errno(status);
	spin_unlock_irqrestore(&q->lock, irqflags);

	if (!ret) {
		atomic64_inc(&cd->n_requests);
		atomic64_add(nsegs, &cd->n_segments);
		atomic64_add(bytes, &cd->n_bytes);
		return 0;
	}
	if (ret == -EBUSY) {
		atomic64_inc(&cd->n_busy);
	} else {
		atomic64_inc(&cd->n_failed);
		dev_err_ratelimited(&cd->vdev->dev,
				    "request %llu (type %u, %u segments, %llu bytes) failed: %d (used length %u, status %u)\n",
				    tag, type, nsegs, bytes, ret, len, status);
	}
	return ret;
}

/*
 * One request to the active device.  A BUSY answer means the host's rate
 * limit refused it and flushed nothing: a caller that may sleep waits and
 * tries again a few times, doubling the wait, as the spec asks; any other
 * caller gets -EBUSY at once.
 */
static int cfl_request(u32 type, const struct virtio_cache_flush_segment *segs,
		       unsigned int nsegs, u64 bytes, bool may_sleep)
{
	unsigned int attempt;
	int ret;

	for (attempt = 0;; attempt++) {
		read_lock(&cfl_lock);
		ret = cfl_active ? cfl_submit(cfl_active, type, segs, nsegs, bytes)
				 : -ENODEV;
		read_unlock(&cfl_lock);
		if (ret != -EBUSY || !may_sleep || attempt == CFL_BUSY_RETRIES)
			return ret;
		msleep(CFL_BUSY_FIRST_MS << attempt);
	}
}

/* Segments collected for FLUSH_RANGE requests within the device's limits. */
struct cfl_batch {
	struct virtio_cache_flush_segment *segs;
	unsigned int n;
	unsigned int cap;
	u64 bytes;
	u64 max_bytes;
	bool may_sleep;
};

static int cfl_batch_init(struct cfl_batch *b,
			  struct virtio_cache_flush_segment *segs,
			  unsigned int cap, bool may_sleep)
{
	read_lock(&cfl_lock);
	if (!cfl_active) {
		read_unlock(&cfl_lock);
		return -ENODEV;
	}
	b->cap = min(cap, cfl_active->segs_per_req);
	b->max_bytes = cfl_active->max_bytes;
	read_unlock(&cfl_lock);
	b->segs = segs;
	b->n = 0;
	b->bytes = 0;
	b->may_sleep = may_sleep;
	return 0;
}

static int cfl_batch_send(struct cfl_batch *b)
{
	int ret;

	if (!b->n)
		return 0;
	ret = cfl_request(VIRTIO_CACHE_FLUSH_T_RANGE, b->segs, b->n, b->bytes,
			  b->may_sleep);
	b->n = 0;
	b->bytes = 0;
	return ret;
}

/*
 * Add [addr, addr + len) (the caller checked that it does not wrap),
 * merging it with the previous segment when physically contiguous and
 * sending a request whenever the next byte would break a limit.
 */
static int cfl_batch_add(struct cfl_batch *b, u64 addr, u64 len)
{
	int ret;

	while (len) {
		struct virtio_cache_flush_segment *last =
			b->n ? &b->segs[b->n - 1] : NULL;
		bool merge = last && le64_to_cpu(last->addr) +
				     le64_to_cpu(last->len) == addr;
		u64 take = min(len, b->max_bytes - b->bytes);

		if (!take || (!merge && b->n == b->cap)) {
			ret = cfl_batch_send(b);
			if (ret)
				return ret;
			continue;
		}
		if (merge) {
			le64_add_cpu(&last->len, take);
		} else {
			b->segs[b->n].addr = cpu_to_le64(addr);
			b->segs[b->n].len = cpu_to_le64(take);
			b->n++;
		}
		b->bytes += take;
		addr += take;
		len -= take;
	}
	return 0;
}

static int cfl_wbinv_phys(phys_addr_t addr, u64 len, bool may_sleep)
{
	struct virtio_cache_flush_segment seg;
	struct cfl_batch b;
	int ret;

	if (!len)
		return 0;
	if ((u64)addr + len - 1 < (u64)addr)
		return -EINVAL;
	/* One contiguous range: one segment per request, max_bytes each. */
	ret = cfl_batch_init(&b, &seg, 1, may_sleep);
	if (!ret)
		ret = cfl_batch_add(&b, addr, len);
	if (!ret)
		ret = cfl_batch_send(&b);
	return ret;
}

static int cfl_wbinv_all(bool may_sleep)
{
	int ret = 0;

	read_lock(&cfl_lock);
	if (!cfl_active)
		ret = -ENODEV;
	else if (!cfl_active->full)
		ret = -EOPNOTSUPP;
	read_unlock(&cfl_lock);
	if (ret)
		return ret;
	ret = cfl_request(VIRTIO_CACHE_FLUSH_T_ALL, NULL, 0, 0, may_sleep);
	if (!ret) {
		read_lock(&cfl_lock);
		if (cfl_active)
			atomic_set(&cfl_active->full_stale, 1);
		read_unlock(&cfl_lock);
	}
	return ret;
}

/*
 * Re-reads the full-flush figures if a FLUSH_ALL completed since they were
 * read. Four configuration reads (virtio_cread_le checks the generation),
 * done by the next user rather than by the FLUSH_ALL's caller.
 */
static void cfl_refresh_full_figures(struct cfl_device *cd)
{
	u64 cost, even;

	if (!atomic_xchg(&cd->full_stale, 0))
		return;
	virtio_cread_le(cd->vdev, struct virtio_cache_flush_config,
			full_flush_cost_ns, &cost);
	virtio_cread_le(cd->vdev, struct virtio_cache_flush_config,
			full_break_even_bytes, &even);
	WRITE_ONCE(cd->full_cost_ns, cost);
	WRITE_ONCE(cd->break_even, even);
}

int pvflush_wbinv_range(phys_addr_t addr, size_t len)
{
	return cfl_wbinv_phys(addr, len, false);
}
EXPORT_SYMBOL_GPL(pvflush_wbinv_range);

int pvflush_wbinv_all(void)
{
	return cfl_wbinv_all(false);
}
EXPORT_SYMBOL_GPL(pvflush_wbinv_all);

/*
 * A range of the caller's virtual memory: pin its pages (so that their
 * physical addresses stay theirs until the host answered), translate, and
 * send every byte, from the first page's offset to the last page's end.
 */
static long cfl_flush_user(u64 uaddr, u64 len)
{
	struct virtio_cache_flush_segment *segs;
	struct page **pages;
	struct cfl_batch b;
	u64 end, cursor;
	long ret;

	if (!len)
		return 0;
	if (uaddr + len < uaddr)
		return -EINVAL;
	if (!access_ok(u64_to_user_ptr(uaddr), len))
		return -EFAULT;

	pages = kvmalloc_array(CFL_PIN_PAGES, sizeof(*pages), GFP_KERNEL);
	segs = kmalloc_array(CFL_SEGS_MAX, sizeof(*segs), GFP_KERNEL);
	if (!pages || !segs) {
		ret = -ENOMEM;
		goto out;
	}
	ret = cfl_batch_init(&b, segs, CFL_SEGS_MAX, true);
	if (ret)
		goto out;

	end = uaddr + len;
	cursor = uaddr & PAGE_MASK;
	while (cursor < end) {
		u64 left = (PAGE_ALIGN(end) - cursor) >> PAGE_SHIFT;
		int want = min_t(u64, left, CFL_PIN_PAGES);
		int pinned, i;

		pinned = pin_user_pages_fast(cursor, want, 0, pages);
		if (pinned <= 0) {
			ret = pinned ? pinned : -EFAULT;
			break;
		}
		for (i = 0; i < pinned && !ret; i++) {
			u64 page_va = cursor + ((u64)i << PAGE_SHIFT);
			u64 from = max(page_va, uaddr);
			u64 to = min(page_va + PAGE_SIZE, end);

			ret = cfl_batch_add(&b, page_to_phys(pages[i]) +
					    (from - page_va), to - from);
		}
		/* Send while the pages are still pinned. */
		if (!ret)
			ret = cfl_batch_send(&b);
		unpin_user_pages(pages, pinned);
		if (ret)
			break;
		cursor += (u64)pinned << PAGE_SHIFT;
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
	}
out:
	kfree(segs);
	kvfree(pages);
	return ret;
}

static long cfl_info(struct pvflush_info __user *uinfo)
{
	struct pvflush_info info = {};
	struct cfl_device *cd;

	read_lock(&cfl_lock);
	cd = cfl_active;
	if (!cd) {
		read_unlock(&cfl_lock);
		return -ENODEV;
	}
	info.cache_line_size = cd->line_size;
	info.num_queues = cd->dev_queues;
	info.max_segments = cd->dev_max_segments;
	info.queues_used = cd->nqueues;
	info.segments_per_request = cd->segs_per_req;
	info.features = cd->vdev->features;
	info.max_bytes = cd->max_bytes;
	cfl_refresh_full_figures(cd);
	info.full_flush_cost_ns = READ_ONCE(cd->full_cost_ns);
	info.full_break_even_bytes = READ_ONCE(cd->break_even);
	info.full_per_sec_limit = cd->full_limit;
	info.range_bytes_per_sec_limit = cd->range_limit;
	info.requests = atomic64_read(&cd->n_requests);
	info.segments = atomic64_read(&cd->n_segments);
	info.bytes = atomic64_read(&cd->n_bytes);
	info.busy = atomic64_read(&cd->n_busy);
	info.failed = atomic64_read(&cd->n_failed);
	read_unlock(&cfl_lock);

	return copy_to_user(uinfo, &info, sizeof(info)) ? -EFAULT : 0;
}

static long cfl_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;
	struct pvflush_range range;

	switch (cmd) {
	case PVFLUSH_IOC_INFO:
		return cfl_info(uarg);
	case PVFLUSH_IOC_FLUSH_RANGE:
		if (copy_from_user(&range, uarg, sizeof(range)))
			return -EFAULT;
		return cfl_flush_user(range.addr, range.len);
	case PVFLUSH_IOC_FLUSH_ALL:
		return cfl_wbinv_all(true);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations cfl_fops = {
	.owner = THIS_MODULE,
	.open = nonseekable_open,
	.unlocked_ioctl = cfl_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice cfl_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "pvflush",
	/* Every request pauses the whole VM: root only. */
	.mode = 0600,
	.fops = &cfl_fops,
};

#if IS_ENABLED(CONFIG_GENERIC_CPU_CACHE_MAINTENANCE)
/*
 * Provider for cpu_cache_invalidate_memregion(): the framework calls wbinv
 * for every provider, then done.  Our wbinv is synchronous, so done is not
 * needed.  The framework holds a rwsem, so the call may sleep: a BUSY
 * answer is retried.  A region past the host's break-even size is cheaper
 * to flush whole.
 */
MODULE_IMPORT_NS("CACHE_COHERENCY");

struct cfl_cc {
	struct cache_coherency_ops_inst inst;
	struct cfl_device *cd;
};

static int cfl_cc_wbinv(struct cache_coherency_ops_inst *cci,
			struct cc_inval_params *invp)
{
	struct cfl_cc *cc = container_of(cci, struct cfl_cc, inst);
	u64 break_even;

	cfl_refresh_full_figures(cc->cd);
	break_even = READ_ONCE(cc->cd->break_even);
	if (cc->cd->full && break_even && invp->size > break_even)
		return cfl_wbinv_all(true);
	return cfl_wbinv_phys(invp->addr, invp->size, true);
}

static const struct cache_coherency_ops cfl_cc_ops = {
	.wbinv = cfl_cc_wbinv,
};

static int cfl_cc_register(struct cfl_device *cd)
{
	struct cfl_cc *cc;
	int ret;

	cc = cache_coherency_ops_instance_alloc(&cfl_cc_ops, struct cfl_cc,
						inst);
	if (!cc)
		return -ENOMEM;
	cc->cd = cd;
	ret = cache_coherency_ops_instance_register(&cc->inst);
	if (ret) {
		cache_coherency_ops_instance_put(&cc->inst);
		return ret;
	}
	cd->cc = cc;
	return 0;
}

static void cfl_cc_unregister(struct cfl_device *cd)
{
	if (!cd->cc)
		return;
	cache_coherency_ops_instance_unregister(&cd->cc->inst);
	cache_coherency_ops_instance_put(&cd->cc->inst);
	cd->cc = NULL;
}
#else
/* Before 6.19 the kernel has no framework to provide for. */
static int cfl_cc_register(struct cfl_device *cd)
{
	return 0;
}

static void cfl_cc_unregister(struct cfl_device *cd)
{
}
#endif

static void cfl_del_vqs(struct cfl_device *cd)
{
	unsigned int i;

	if (!cd->queues)
		return;
	cd->vdev->config->del_vqs(cd->vdev);
	for (i = 0; i < cd->nqueues; i++)
		kfree(cd->queues[i].req);
	kfree(cd->queues);
	cd->queues = NULL;
	cd->nqueues = 0;
}

static int cfl_init_vqs(struct cfl_device *cd)
{
	unsigned int nq = min3(cd->dev_queues, nr_cpu_ids,
			       (unsigned int)VIRTIO_CACHE_FLUSH_MAX_QUEUES);
	struct virtqueue **vqs;
#ifdef CFL_HAVE_VIRTQUEUE_INFO
	struct virtqueue_info *infos;
#else
	vq_callback_t **callbacks;
	const char **names;
#endif
	unsigned int i;
	int ret = -ENOMEM;

	cd->queues = kcalloc(nq, sizeof(*cd->queues), GFP_KERNEL);
	vqs = kcalloc(nq, sizeof(*vqs), GFP_KERNEL);
#ifdef CFL_HAVE_VIRTQUEUE_INFO
	infos = kcalloc(nq, sizeof(*infos), GFP_KERNEL);
	if (!cd->queues || !vqs || !infos)
		goto out;
#else
	callbacks = kcalloc(nq, sizeof(*callbacks), GFP_KERNEL);
	names = kcalloc(nq, sizeof(*names), GFP_KERNEL);
	if (!cd->queues || !vqs || !callbacks || !names)
		goto out;
#endif
	cd->nqueues = nq;
	for (i = 0; i < nq; i++) {
		struct cfl_queue *q = &cd->queues[i];

		spin_lock_init(&q->lock);
		snprintf(q->name, sizeof(q->name), "requestq%u", i);
		q->req = kzalloc(sizeof(*q->req), GFP_KERNEL);
		if (!q->req)
			goto out;
		/* No callback: virtio_ring then asks for no interrupts. */
#ifdef CFL_HAVE_VIRTQUEUE_INFO
		infos[i].name = q->name;
#else
		names[i] = q->name;
#endif
	}
#ifdef CFL_HAVE_VIRTQUEUE_INFO
	ret = virtio_find_vqs(cd->vdev, nq, vqs, infos, NULL);
#else
	ret = virtio_find_vqs(cd->vdev, nq, vqs, callbacks, names, NULL);
#endif
	if (ret)
		goto out;
	for (i = 0; i < nq; i++)
		cd->queues[i].vq = vqs[i];
out:
	if (ret && cd->queues) {
		for (i = 0; i < cd->nqueues; i++)
			kfree(cd->queues[i].req);
		kfree(cd->queues);
		cd->queues = NULL;
		cd->nqueues = 0;
	}
	kfree(vqs);
#ifdef CFL_HAVE_VIRTQUEUE_INFO
	kfree(infos);
#else
	kfree(callbacks);
	kfree(names);
#endif
	return ret;
}

static int cfl_read_config(struct cfl_device *cd)
{
	struct virtio_device *vdev = cd->vdev;

	virtio_cread_le(vdev, struct virtio_cache_flush_config,
			cache_line_size, &cd->line_size);
	virtio_cread_le(vdev, struct virtio_cache_flush_config, num_queues,
			&cd->dev_queues);
	virtio_cread_le(vdev, struct virtio_cache_flush_config, max_segments,
			&cd->dev_max_segments);
	virtio_cread_le(vdev, struct virtio_cache_flush_config, max_bytes,
			&cd->max_bytes);
	virtio_cread_le(vdev, struct virtio_cache_flush_config,
			full_flush_cost_ns, &cd->full_cost_ns);
	virtio_cread_le(vdev, struct virtio_cache_flush_config,
			full_break_even_bytes, &cd->break_even);
	virtio_cread_le(vdev, struct virtio_cache_flush_config,
			full_per_sec_limit, &cd->full_limit);
	virtio_cread_le(vdev, struct virtio_cache_flush_config,
			range_bytes_per_sec_limit, &cd->range_limit);

	if (!cd->line_size || !is_power_of_2(cd->line_size) ||
	    !cd->dev_queues || !cd->dev_max_segments || !cd->max_bytes) {
		dev_err(&vdev->dev,
			"bad configuration: line %u, queues %u, max_segments %u, max_bytes %llu\n",
			cd->line_size, cd->dev_queues, cd->dev_max_segments,
			cd->max_bytes);
		return -EINVAL;
	}
	cd->segs_per_req = min_t(u32, cd->dev_max_segments, CFL_SEGS_MAX);
	cd->full = virtio_has_feature(vdev, VIRTIO_CACHE_FLUSH_F_FULL);
	return 0;
}

#ifdef CONFIG_PM_SLEEP
static int cfl_freeze(struct virtio_device *vdev)
{
	struct cfl_device *cd = vdev->priv;

	set_bit(CFL_FROZEN, &cd->flags);
	cfl_wait_for_requests();
	/* After the reset the device writes nothing for abandoned requests. */
	virtio_reset_device(vdev);
	cfl_del_vqs(cd);
	return 0;
}

static int cfl_restore(struct virtio_device *vdev)
{
	struct cfl_device *cd = vdev->priv;
	int ret;

	ret = cfl_init_vqs(cd);
	if (ret)
		return ret;
	virtio_device_ready(vdev);
	clear_bit(CFL_FROZEN, &cd->flags);
	return 0;
}

/* A reset is a suspend and resume of the device alone. */
static int cfl_reset(struct virtio_device *vdev)
{
	int ret = virtio_device_freeze(vdev);

	return ret ? ret : virtio_device_restore(vdev);
}
#else
/* Without the suspend path there is no driver-level re-initialisation. */
static int cfl_reset(struct virtio_device *vdev)
{
	return -EOPNOTSUPP;
}
#endif

/*
 * The device set DEVICE_NEEDS_RESET, or did not answer in time: reset it
 * and set the queues up again, as a resume from suspend does.
 */
static void cfl_reset_work(struct work_struct *work)
{
	struct cfl_device *cd = container_of(work, struct cfl_device,
					     reset_work);
	struct virtio_device *vdev = cd->vdev;
	int ret;

	dev_warn(&vdev->dev, "resetting the device\n");
	ret = cfl_reset(vdev);
	if (ret) {
		set_bit(CFL_BROKEN, &cd->flags);
		dev_err(&vdev->dev, "reset failed (%d): out of service\n", ret);
	} else {
		dev_info(&vdev->dev, "device reset; serving requests again\n");
	}
	clear_bit(CFL_RESET_PENDING, &cd->flags);
}

static void cfl_config_changed(struct virtio_device *vdev)
{
	struct cfl_device *cd = vdev->priv;

	/* The configuration is fixed; the only news can be NEEDS_RESET. */
	if (vdev->config->get_status(vdev) & VIRTIO_CONFIG_S_NEEDS_RESET)
		cfl_request_reset(cd);
}

static int cfl_probe(struct virtio_device *vdev)
{
	struct cfl_device *cd;
	unsigned long irqflags;
	bool first;
	int ret;

	if (!virtio_has_feature(vdev, VIRTIO_CACHE_FLUSH_F_RANGE)) {
		dev_err(&vdev->dev, "device does not offer FLUSH_RANGE\n");
		return -ENODEV;
	}
	cd = kzalloc(sizeof(*cd), GFP_KERNEL);
	if (!cd)
		return -ENOMEM;
	cd->vdev = vdev;
	vdev->priv = cd;
	INIT_WORK(&cd->reset_work, cfl_reset_work);

	ret = cfl_read_config(cd);
	if (ret)
		goto err_free;
	ret = cfl_init_vqs(cd);
	if (ret)
		goto err_free;
	virtio_device_ready(vdev);

	write_lock_irqsave(&cfl_lock, irqflags);
	first = !cfl_active;
	if (first)
		cfl_active = cd;
	write_unlock_irqrestore(&cfl_lock, irqflags);
	if (!first) {
		dev_err(&vdev->dev, "a cache-flush device is already bound\n");
		ret = -EBUSY;
		goto err_reset;
	}
	ret = misc_register(&cfl_misc);
	if (ret)
		goto err_inactive;
	ret = cfl_cc_register(cd);
	if (ret)
		goto err_misc;

	dev_info(&vdev->dev,
		 "cache-flush device: %u of %u queues, %u-byte lines, %u segments and %llu bytes per request, full flush %s\n",
		 cd->nqueues, cd->dev_queues, cd->line_size, cd->segs_per_req,
		 cd->max_bytes, cd->full ? "offered" : "not offered");
	return 0;

err_misc:
	misc_deregister(&cfl_misc);
err_inactive:
	write_lock_irqsave(&cfl_lock, irqflags);
	cfl_active = NULL;
	write_unlock_irqrestore(&cfl_lock, irqflags);
err_reset:
	virtio_reset_device(vdev);
	cfl_del_vqs(cd);
err_free:
	kfree(cd);
	vdev->priv = NULL;
	return ret;
}

static void cfl_remove(struct virtio_device *vdev)
{
	struct cfl_device *cd = vdev->priv;
	unsigned long irqflags;

	cfl_cc_unregister(cd);
	misc_deregister(&cfl_misc);
	set_bit(CFL_GONE, &cd->flags);
	/* Waits for every request in flight, as cfl_wait_for_requests(). */
	write_lock_irqsave(&cfl_lock, irqflags);
	cfl_active = NULL;
	write_unlock_irqrestore(&cfl_lock, irqflags);
	cancel_work_sync(&cd->reset_work);
	virtio_reset_device(vdev);
	cfl_del_vqs(cd);
	kfree(cd);
}

static const struct virtio_device_id cfl_id_table[] = {
	{ VIRTIO_ID_CACHE_FLUSH, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, cfl_id_table);

static unsigned int cfl_features[] = {
	VIRTIO_CACHE_FLUSH_F_RANGE,
	VIRTIO_CACHE_FLUSH_F_FULL,
};

static struct virtio_driver cfl_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = cfl_id_table,
	.feature_table = cfl_features,
	.feature_table_size = ARRAY_SIZE(cfl_features),
	.probe = cfl_probe,
	.remove = cfl_remove,
	.config_changed = cfl_config_changed,
#ifdef CONFIG_PM_SLEEP
	.freeze = cfl_freeze,
	.restore = cfl_restore,
#endif
};
module_virtio_driver(cfl_driver);

MODULE_DESCRIPTION("Virtio paravirtual cache-flush driver");
MODULE_LICENSE("GPL");
