# Workload throughput per mode, with the noisy neighbour on y2 and the migration events.
# Written by Workloads/bench/report.py; regenerate with: cd OUT_DIR && gnuplot throughput.gp
# Data: plotdata/<dir>-load.dat (ops/s per load interval, x = s since load start, drawn as steps
# over each interval) and plotdata/<dir>-neighbour.dat (neighbour work units/s).
set encoding utf8
do for [fmt in "png svg"] {
  if (fmt eq "png") {
    set terminal pngcairo noenhanced size 1200,960 font "sans,10"
    set output "throughput.png"
  } else {
    set terminal svg noenhanced size 1200,960 dynamic font "sans,10" background rgb "white"
    set output "throughput.svg"
  }
  set multiplot layout 3,1
  set xrange [0.000:60.005]
  set grid xtics ytics lc rgb "#dddddd"
  set xlabel "s since load start"
  set key bottom left opaque box samplen 2 font ",8"
  set tics out
  set border 11
  unset arrow
  unset label
  set title "memcached enlightened: downtime 61 ms, T_release 4,808 ms"
  set yrange [0:4704.819]
  set ylabel "workload ops/s"
  set y2range [0:1872.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 20.822, graph 0 to 20.822, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 20.822, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 20.883, graph 0 to 20.883, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 20.883, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 21.665, graph 0 to 21.665, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 21.665, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 28.845, graph 0 to 28.845, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 28.845, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 677.160 to graph 1, first 677.160 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 968.097 to graph 1, second 968.097 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-enlightened-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-enlightened-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "memcached postcopy: downtime 128 ms, T_release 10,211 ms"
  set yrange [0:4344.622]
  set ylabel "workload ops/s"
  set y2range [0:1890.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 25.207, graph 0 to 25.207, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 25.207, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 25.335, graph 0 to 25.335, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 25.335, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 26.219, graph 0 to 26.219, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 26.219, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 33.568, graph 0 to 33.568, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 33.568, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 1034.640 to graph 1, first 1034.640 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 598.590 to graph 1, second 598.590 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-postcopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-postcopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "memcached precopy: downtime 94 ms, T_release 24,974 ms"
  set yrange [0:4698.000]
  set ylabel "workload ops/s"
  set y2range [0:984.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.005, graph 0 to 10.005, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.005, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 44.457, graph 0 to 44.457, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 44.457, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 44.551, graph 0 to 44.551, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 44.551, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 44.790, graph 0 to 44.790, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 44.790, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 48.280, graph 0 to 48.280, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 48.280, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 1006.920 to graph 1, first 1006.920 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 525.608 to graph 1, second 525.608 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-precopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-precopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset multiplot
  unset output
}
