"""vballoon: a virtio-balloon vhost-user back-end that maps the guest's free pages."""
__version__ = "0.1.0"
